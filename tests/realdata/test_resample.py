"""Probabilities brought from the working grid back to the scan's grid: the same numbers as
PyTorch's trilinear interpolation of the whole volume, a slab at a time, with the body crop undone;
and boundaries closer to the truth than the nearest neighbour of the label map."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metrics import dice, hd95
from realdata.preprocess import linear_taps, resampled_slabs, to_original_grid


def geometry(resampled, ras_shape, box) -> dict:
    return {"resampled": list(resampled), "ras_shape": list(ras_shape),
            "box": [list(b) for b in box], "affine": np.eye(4).tolist()}


def resampled(channels: torch.Tensor, geo: dict, fill, slab: int = 8) -> torch.Tensor:
    parts = list(resampled_slabs(channels, geo, fill, slab))
    starts = [rows.start for rows, _ in parts]
    assert starts == sorted(starts) and parts[-1][0].stop == geo["ras_shape"][0]
    return torch.cat([values for _, values in parts], dim=1)


@pytest.mark.parametrize("res, ras, box, slab", [
    ((7, 9, 5), (20, 13, 17), ((1, 6), (0, 9), (2, 5)), 3),  # up, down and a crop on two axes
    ((30, 20, 10), (12, 9, 4), ((0, 30), (3, 17), (0, 10)), 5),  # down on every axis
    ((6, 6, 6), (6, 6, 6), ((0, 6), (0, 6), (0, 6)), 100),  # the same grid: every value kept
])
def test_slabs_equal_pytorchs_trilinear_of_the_whole_uncropped_volume(res, ras, box, slab):
    torch.manual_seed(0)
    inside = torch.rand(3, *[hi - lo for lo, hi in box])
    fill = (0.0, 1.0, 0.25)
    whole = torch.tensor(fill)[:, None, None, None].expand(3, *res).clone()
    whole[(slice(None), *[slice(lo, hi) for lo, hi in box])] = inside
    expected = F.interpolate(whole[None], size=ras, mode="trilinear", align_corners=False)[0]
    got = resampled(inside, geometry(res, ras, box), fill, slab)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    if res == ras:
        assert torch.equal(got, inside)


def test_linear_taps_follow_the_half_voxel_rule():
    # 2 voxels to 4 over one extent: output centres at 0.25, 0.75, 1.25, 1.75 input voxels, i.e.
    # source coordinates -0.25 (held at 0), 0.25, 0.75, 1.25 (its second tap held at the last)
    lo, hi, w = linear_taps(2, 4)
    assert lo.tolist() == [0, 0, 0, 1] and hi.tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(w, torch.tensor([0.0, 0.25, 0.75, 0.25]))


def test_a_spheres_probability_at_6_mm_comes_back_to_1_mm_closer_to_the_sphere_than_nn():
    n, radius, centre = 48, 13.3, np.array([23.0, 25.2, 21.7])
    centres = np.indices((n, n, n)).transpose(1, 2, 3, 0) + 0.5
    sphere = torch.from_numpy(np.linalg.norm(centres - centre, axis=-1) <= radius)
    # the probability a perfect model gives at 6 mm: the share of each voxel inside the sphere
    prob = F.avg_pool3d(sphere.float()[None, None], 6)[0, 0]
    geo = geometry((8, 8, 8), (n, n, n), ((0, 8),) * 3)
    nearest = torch.from_numpy(to_original_grid(prob > 0.5, geo))
    linear = resampled(prob[None], geo, (0.0,))[0] > 0.5
    d_nearest, d_linear = dice(nearest, sphere), dice(linear, sphere)
    assert d_linear > 0.9 and d_linear > d_nearest + 0.03, (d_linear, d_nearest)
    assert hd95(linear, sphere, 1.0) < hd95(nearest, sphere, 1.0)
