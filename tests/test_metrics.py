"""The metrics: Dice with its empty-mask rule, every organ's Dice from one confusion count, and
HD95 and surface Dice on shapes with known distances, a brute-force reference and MONAI."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from metrics import dice, hd95, label_dice, surface_dice, surface_distances

# ---------------------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------------------


def mask(shape, *voxels):
    m = torch.zeros(shape, dtype=torch.bool)
    for v in voxels:
        m[v] = True
    return m


def test_dice_of_identical_masks_is_one():
    m = mask((4, 4, 4), (0, 0, 0), (1, 2, 3), (3, 3, 3))
    assert dice(m, m.clone()) == 1.0


def test_dice_of_disjoint_masks_is_zero():
    assert dice(mask((4, 4, 4), (0, 0, 0)), mask((4, 4, 4), (1, 1, 1))) == 0.0


def test_dice_partial_overlap_matches_hand_computation():
    # pred 3 voxels, truth 2 voxels, 1 shared: 2 * 1 / (3 + 2)
    pred = mask((4, 4, 4), (0, 0, 0), (0, 0, 1), (0, 0, 2))
    truth = mask((4, 4, 4), (0, 0, 2), (3, 3, 3))
    assert dice(pred, truth) == pytest.approx(0.4)
    assert dice(truth, pred) == pytest.approx(0.4)  # symmetric


def test_dice_of_two_empty_masks_is_one():
    assert dice(mask((3, 3, 3)), mask((3, 3, 3))) == 1.0


def test_dice_with_exactly_one_empty_mask_is_zero():
    some = mask((3, 3, 3), (1, 1, 1))
    assert dice(some, mask((3, 3, 3))) == 0.0
    assert dice(mask((3, 3, 3)), some) == 0.0


def test_dice_treats_nonzero_values_as_foreground():
    # integer label maps count any nonzero voxel, whatever its value
    pred = torch.tensor([0, 2, 2, 0])
    truth = torch.tensor([0, 1, 0, 0])
    assert dice(pred, truth) == pytest.approx(2 * 1 / 3)


def test_label_dice_equals_dice_of_each_organs_masks():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (20, 18, 16), generator=g)
    noise = torch.randint(0, 5, truth.shape, generator=g)
    pred = torch.where(torch.rand(truth.shape, generator=g) < 0.3, noise, truth)
    pred[pred == 3] = 0  # organ 3 never predicted: Dice 0 against a present truth
    truth[truth == 4] = 0
    pred[pred == 4] = 0  # organ 4 absent in both: Dice 1
    expected = [dice(pred == c, truth == c) for c in range(1, 5)]
    assert label_dice(pred, truth, 4) == pytest.approx(expected, abs=0)
    assert expected[2] == 0.0 and expected[3] == 1.0 and 0 < expected[0] < 1


def test_label_dice_beyond_uint8_range_and_bad_labels():
    truth = torch.arange(40).reshape(2, 4, 5) % 20
    pred = truth.clone()
    pred[0, 0, :3] = 0
    expected = [dice(pred == c, truth == c) for c in range(1, 20)]
    assert label_dice(pred, truth, 19) == pytest.approx(expected, abs=0)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        label_dice(pred, truth, 4)
    with pytest.raises(ValueError, match=r"0\.\.19"):
        label_dice(pred - 1, truth, 19)


# ---------------------------------------------------------------------------------------
# Surface metrics
# ---------------------------------------------------------------------------------------

CT_SPACING = (0.8, 0.8, 3.0)  # in-plane 0.8 mm, 3 mm slices: an axis mix-up changes every distance


def cube(shape: tuple[int, ...], corner: tuple[int, ...], side: int = 10) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + side) for c in corner)] = True
    return mask


def ball(
    shape: tuple[int, ...], centre_mm: np.ndarray, radius_mm: float, spacing: tuple[float, ...]
) -> np.ndarray:
    axes = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((x - c) ** 2 for x, c in zip(axes, centre_mm)) <= radius_mm**2


def blob_pair(seed: int, shape: tuple[int, ...] = (40, 36, 14)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random truth and a prediction that differs from it by smaller random blobs."""
    rng = np.random.default_rng(seed)

    def blobs(sigma: tuple[float, ...], keep: float) -> np.ndarray:
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
        return field > np.quantile(field, 1 - keep)

    truth = blobs((4, 4, 1.5), 0.3)
    return truth ^ blobs((2, 2, 1), 0.07), truth


# ---------------------------------------------------------------------------------------
# Shapes with known distances
# ---------------------------------------------------------------------------------------


def test_cubes_offset_along_z_use_the_slice_spacing() -> None:
    truth = cube((20, 20, 20), (4, 4, 4))
    pred = cube((20, 20, 20), (4, 4, 6))  # two 3 mm slices up
    assert hd95(pred, truth, CT_SPACING) == pytest.approx(6.0, abs=1e-9)


def test_cubes_offset_along_x_use_the_in_plane_spacing() -> None:
    truth = cube((20, 20, 20), (4, 4, 4))
    pred = cube((20, 20, 20), (6, 4, 4))  # two 0.8 mm voxels along the first axis
    assert hd95(pred, truth, CT_SPACING) == pytest.approx(1.6, abs=1e-9)


def test_sphere_against_a_shifted_sphere_is_about_the_shift() -> None:
    shape = (48, 48, 16)
    centre = np.array([n * s / 2 for n, s in zip(shape, CT_SPACING)])
    truth = ball(shape, centre, 12.0, CT_SPACING)
    pred = ball(shape, centre + np.array([3.2, 0.0, 0.0]), 12.0, CT_SPACING)  # 4 voxels
    # The farthest surface points are exactly the shift apart; the 95th percentile sits a little
    # below it.
    assert 2.8 < hd95(pred, truth, CT_SPACING) <= 3.2 + 1e-9


def test_identical_masks_score_zero_and_one() -> None:
    _, truth = blob_pair(0)
    assert hd95(truth, truth, CT_SPACING) == 0.0
    assert surface_dice(truth, truth, CT_SPACING, tolerance_mm=0.0) == 1.0


def test_surface_dice_is_one_within_the_tolerance_and_below_one_beyond_it() -> None:
    truth = cube((20, 20, 20), (4, 4, 4))
    in_plane = cube((20, 20, 20), (6, 4, 4))  # 1.6 mm off
    across_slices = cube((20, 20, 20), (4, 4, 6))  # 6 mm off
    assert surface_dice(in_plane, truth, CT_SPACING, tolerance_mm=2.0) == 1.0
    assert 0.0 < surface_dice(across_slices, truth, CT_SPACING, tolerance_mm=2.0) < 1.0
    assert surface_dice(across_slices, truth, CT_SPACING, tolerance_mm=6.0) == 1.0


def test_a_distance_equal_to_the_tolerance_counts_as_within_it() -> None:
    # 3 x 0.8 mm comes out of the distance transform as 2.4000000000000004; MONAI compares in
    # float32, where it equals 2.4, so every surface voxel is within a 2.4 mm tolerance (float64
    # would score 0.73).
    truth = cube((20, 20, 20), (4, 4, 4))
    pred = cube((20, 20, 20), (7, 4, 4))
    assert surface_dice(pred, truth, CT_SPACING, tolerance_mm=2.4) == 1.0


def test_nested_cubes_are_compared_by_their_surfaces_not_their_volumes() -> None:
    # Every voxel of the inner cube lies inside the outer one, yet the two surfaces are >= 3 voxels
    # apart: with volumes instead of surfaces half the distances would be 0 and the score well above
    # 0.
    outer = cube((16, 16, 16), (2, 2, 2), side=10)
    inner = cube((16, 16, 16), (5, 5, 5), side=4)
    assert surface_dice(inner, outer, 1.0, tolerance_mm=2.0) == 0.0
    assert hd95(inner, outer, 1.0) >= 3.0


def test_hd95_is_symmetric_and_takes_the_larger_direction() -> None:
    outer = cube((16, 16, 16), (2, 2, 2), side=10)
    inner = cube((16, 16, 16), (5, 5, 5), side=4)
    inner_to_outer, outer_to_inner = surface_distances(inner, outer, 1.0)
    # every inner face is 3 voxels from the outer face beside it
    assert set(inner_to_outer) == {3.0}
    # The outer surface's edges and corners lie farther from the inner cube, so its direction sets
    # HD95.
    assert (
        hd95(inner, outer, 1.0)
        == hd95(outer, inner, 1.0)
        == pytest.approx(np.percentile(outer_to_inner, 95))
    )
    assert hd95(inner, outer, 1.0) > 4.0


def test_agrees_with_brute_force_surface_distances() -> None:
    pred, truth = blob_pair(1, shape=(18, 16, 8))
    spacing = (1.1, 0.7, 2.5)

    def surface_points(mask: np.ndarray) -> np.ndarray:
        # A foreground voxel is on the surface when one of its 6 neighbours is background or off the
        # array.
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    pairwise = cdist(surface_points(pred), surface_points(truth))
    p_to_t, t_to_p = pairwise.min(axis=1), pairwise.min(axis=0)
    expected_hd95 = max(np.percentile(p_to_t, 95), np.percentile(t_to_p, 95))
    expected_nsd = (np.sum(p_to_t <= 2.0) + np.sum(t_to_p <= 2.0)) / (p_to_t.size + t_to_p.size)
    assert hd95(pred, truth, spacing) == pytest.approx(expected_hd95, abs=1e-9)
    assert surface_dice(pred, truth, spacing, tolerance_mm=2.0) == pytest.approx(
        expected_nsd, abs=1e-12
    )


def test_masks_touching_the_array_border_have_a_surface_there() -> None:
    truth = np.zeros((12, 12, 6), dtype=bool)
    truth[:6] = True  # fills the array up to its first face
    pred = np.roll(truth, 1, axis=0)
    distances = surface_distances(pred, truth, CT_SPACING)
    assert np.unique(np.concatenate(distances).round(9)).tolist() == [0.0, 0.8]


def test_torch_and_numpy_inputs_agree() -> None:
    pred, truth = blob_pair(2)
    as_numpy = (hd95(pred, truth, CT_SPACING), surface_dice(pred, truth, CT_SPACING))
    as_torch = (
        hd95(torch.from_numpy(pred), torch.from_numpy(truth).float(), CT_SPACING),
        surface_dice(torch.from_numpy(pred), torch.from_numpy(truth), CT_SPACING),
    )
    assert as_torch == as_numpy


def test_rejects_mismatched_shapes_spacing_and_tolerance() -> None:
    mask = cube((8, 8, 8), (2, 2, 2), side=3)
    with pytest.raises(ValueError, match="shapes"):
        hd95(mask, mask[:-1], CT_SPACING)
    with pytest.raises(ValueError, match="spacing"):
        hd95(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice(mask, mask, CT_SPACING, tolerance_mm=-1.0)


# ---------------------------------------------------------------------------------------
# Empty masks: MONAI's rule
# ---------------------------------------------------------------------------------------


def test_both_empty_is_nan_for_both_metrics() -> None:
    empty = np.zeros((8, 8, 8), dtype=bool)
    assert math.isnan(hd95(empty, empty, CT_SPACING))
    assert math.isnan(surface_dice(empty, empty, CT_SPACING))


@pytest.mark.parametrize("empty_side", ["pred", "truth"])
def test_one_empty_is_nan_hd95_and_zero_surface_dice(empty_side: str) -> None:
    mask, empty = cube((8, 8, 8), (2, 2, 2), side=3), np.zeros((8, 8, 8), dtype=bool)
    pred, truth = (empty, mask) if empty_side == "pred" else (mask, empty)
    assert math.isnan(hd95(pred, truth, CT_SPACING))
    assert surface_dice(pred, truth, CT_SPACING) == 0.0


# ---------------------------------------------------------------------------------------
# Agreement with MONAI
# ---------------------------------------------------------------------------------------


def _monai(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...], tolerances: list[float]
):
    metrics = pytest.importorskip("monai.metrics")
    p, t = (torch.as_tensor(m, dtype=torch.float32)[None, None] for m in (pred, truth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks
        hd = metrics.compute_hausdorff_distance(
            p, t, include_background=True, percentile=95, spacing=spacing
        )
        nsd = [
            metrics.compute_surface_dice(
                p, t, [tol], include_background=True, spacing=spacing
            ).item()
            for tol in tolerances
        ]
    return hd.item(), nsd


# 2.4 mm is exactly 3 in-plane voxels at 0.8 mm: the float32 tie MONAI counts as within the
# tolerance.
TOLERANCES = [1.0, 2.0, 2.4, 3.0]


@pytest.mark.parametrize(
    ("seed", "spacing"), [(3, CT_SPACING), (4, (1.2, 0.7, 2.5)), (5, CT_SPACING)]
)
def test_matches_monai_on_random_blobs(seed: int, spacing: tuple[float, ...]) -> None:
    pred, truth = blob_pair(seed)
    monai_hd, monai_nsd = _monai(pred, truth, spacing, TOLERANCES)
    assert hd95(pred, truth, spacing) == pytest.approx(monai_hd, abs=1e-3)
    assert [surface_dice(pred, truth, spacing, tol) for tol in TOLERANCES] == pytest.approx(
        monai_nsd, abs=1e-4
    )


@pytest.mark.parametrize("case", ["both empty", "pred empty", "truth empty"])
def test_matches_monai_on_empty_masks(case: str) -> None:
    mask, empty = cube((10, 10, 6), (2, 2, 1), side=4), np.zeros((10, 10, 6), dtype=bool)
    pred, truth = {
        "both empty": (empty, empty),
        "pred empty": (empty, mask),
        "truth empty": (mask, empty),
    }[case]
    monai_hd, (monai_nsd,) = _monai(pred, truth, CT_SPACING, [2.0])
    np.testing.assert_equal(hd95(pred, truth, CT_SPACING), monai_hd)  # nan == nan here
    np.testing.assert_equal(surface_dice(pred, truth, CT_SPACING), monai_nsd)
