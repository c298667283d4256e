"""The device-resident patch sampler: exact crops, the pos/neg ratio, augmentation that keeps
image and label aligned, the border, seeds; and where it runs (the CPU on Apple's MPS)."""

import math

import pytest
import torch

import train
from data import Case
from sampler import PatchSampler, SamplerConfig, sampler_device, site_sampler

# ---------------------------------------------------------------------------------------
# PatchSampler
# ---------------------------------------------------------------------------------------

SHAPE = (40, 36, 30)
PATCH = (16, 16, 8)
FG_BOX = (slice(10, 18), slice(12, 20), slice(8, 14))


def coordinate_volume(shape, base=1.0):
    """An image whose value is `base` + the voxel's flat index, so a patch reveals where it came
    from.

    Values start at 1 so that every voxel counts as body (> 0) for background candidates.
    """
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + base


def box_label(shape, boxes):
    lab = torch.zeros(shape, dtype=torch.uint8)
    for box, value in boxes:
        lab[box] = value
    return lab


def locate(patch, image, base):
    """Start (x0, y0, z0) of the crop of `image` that `patch` would be, read from its first voxel.
    """
    _, sy, sz = image.shape
    flat = int(patch[0, 0, 0].item() - base)
    return flat // (sy * sz), (flat // sz) % sy, flat % sz


def assert_exact_crop(patch, image, base):
    x0, y0, z0 = locate(patch, image, base)
    px, py, pz = patch.shape
    sx, sy, sz = image.shape
    assert 0 <= x0 <= sx - px and 0 <= y0 <= sy - py and 0 <= z0 <= sz - pz, (
        "patch leaves the volume"
    )
    assert torch.equal(patch, image[x0:x0 + px, y0:y0 + py, z0:z0 + pz])
    return x0, y0, z0


def test_batch_shapes_and_dtypes():
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=3, patches_per_volume=2)
    sampler = PatchSampler([coordinate_volume(SHAPE)], [box_label(SHAPE, [(FG_BOX, 1)])], cfg)
    img, lab = sampler.sample()
    assert img.shape == (6, 1, *PATCH) and img.dtype == torch.float32
    assert lab.shape == (6, *PATCH) and lab.dtype == torch.int64


def test_unaugmented_patches_are_exact_in_bounds_crops_of_their_own_volume():
    # two volumes of different shapes with disjoint value ranges: checks the flat-buffer offsets
    small = (24, 20, 18)
    images = [coordinate_volume(SHAPE), coordinate_volume(small, base=1.0 + math.prod(SHAPE))]
    labels = [box_label(SHAPE, [(FG_BOX, 1)]), box_label(small, [((slice(2, 6),) * 3, 2)])]
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=8, patches_per_volume=4, augment=False)
    sampler = PatchSampler(images, labels, cfg, seed=3)
    seen = set()
    for _ in range(3):
        img, lab = sampler.sample()
        for patch, patch_lab in zip(img[:, 0], lab):
            v = int(patch[0, 0, 0].item() >= 1 + math.prod(SHAPE))
            x0, y0, z0 = assert_exact_crop(patch, images[v], 1.0 + v * math.prod(SHAPE))
            # the label is cut from the same place as the image
            assert torch.equal(
                patch_lab,
                labels[v][x0 : x0 + PATCH[0], y0 : y0 + PATCH[1], z0 : z0 + PATCH[2]].long(),
            )
            seen.add(v)
    assert seen == {0, 1}


def test_volume_smaller_than_patch_is_zero_padded():
    shape = (10, 12, 6)
    image = coordinate_volume(shape)
    label = box_label(shape, [((slice(3, 6), slice(4, 8), slice(1, 4)), 1)])
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=2, patches_per_volume=2, augment=False)
    img, lab = PatchSampler([image], [label], cfg).sample()
    assert img.shape == (4, 1, *PATCH) and lab.shape == (4, *PATCH)
    for patch, patch_lab in zip(img[:, 0], lab):
        inside = patch != 0
        assert int(inside.sum()) == image.numel()
        # the whole volume sits in the patch as one block; everything around it is padding
        x0, y0, z0 = (int(i) for i in torch.nonzero(inside)[0])
        block = (slice(x0, x0 + shape[0]), slice(y0, y0 + shape[1]), slice(z0, z0 + shape[2]))
        assert torch.equal(patch[block], image)
        assert torch.equal(patch_lab[block], label.long())
        assert int(patch_lab[~inside].abs().sum()) == 0


def centre_labels(pos, neg, seed=0):
    cfg = SamplerConfig(
        patch=PATCH, volumes_per_batch=50, patches_per_volume=40, pos=pos, neg=neg, augment=False
    )
    label = box_label(SHAPE, [(FG_BOX, 1)])
    sampler = PatchSampler([coordinate_volume(SHAPE)], [label], cfg, seed=seed)
    _, centre, want_fg = sampler.centres()
    return label[centre[:, 0], centre[:, 1], centre[:, 2]], want_fg


@pytest.mark.parametrize(("pos", "neg", "expected"), [(1.0, 1.0, 0.5), (3.0, 1.0, 0.75)])
def test_foreground_centre_fraction_follows_pos_neg_ratio(pos, neg, expected):
    centre_lab, want_fg = centre_labels(pos, neg)
    assert len(want_fg) == 2000
    # binomial std over 2000 draws is ~0.011, so 0.04 is a ~4 sigma band
    assert abs(float((centre_lab > 0).float().mean()) - expected) < 0.04


def test_centre_label_agrees_with_want_fg():
    centre_lab, want_fg = centre_labels(1.0, 1.0, seed=5)
    assert torch.equal(centre_lab > 0, want_fg)


def test_volume_without_foreground_gives_background_centres():
    cfg = SamplerConfig(
        patch=PATCH, volumes_per_batch=10, patches_per_volume=10, pos=1.0, neg=0.0, augment=False
    )
    label = torch.zeros(SHAPE, dtype=torch.uint8)
    _, centre, want_fg = PatchSampler([coordinate_volume(SHAPE)], [label], cfg).centres()
    assert not want_fg.any()
    assert (centre >= 0).all() and (centre < torch.tensor(SHAPE)).all()


def test_patch_contains_its_centre_and_foreground_when_drawn_as_foreground():
    # a foreground box touching the corner, so many centres are shifted inwards at the border
    label = box_label(SHAPE, [((slice(0, 6), slice(0, 6), slice(0, 4)), 1)])
    image = coordinate_volume(SHAPE)
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=20, patches_per_volume=10, augment=False)
    # with augment off a batch draws only its centres, so a twin sampler reports them
    _, centre, want_fg = PatchSampler([image], [label], cfg, seed=11).centres()
    img, lab = PatchSampler([image], [label], cfg, seed=11).sample()
    assert want_fg.any() and not want_fg.all()
    for patch, patch_lab, c, fg in zip(img[:, 0], lab, centre, want_fg):
        assert_exact_crop(patch, image, 1.0)
        assert (patch == image[c[0], c[1], c[2]]).any(), (
            "the centre voxel must lie inside its patch"
        )
        if fg:
            assert (patch_lab > 0).any()


def augmenting_sampler(seed, **kw):
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=2, patches_per_volume=3, augment=True, **kw)
    label = box_label(SHAPE, [(FG_BOX, 1), ((slice(25, 35), slice(5, 15), slice(15, 25)), 3)])
    return PatchSampler([coordinate_volume(SHAPE) / 1000], [label], cfg, seed=seed)


def test_same_seed_gives_bitwise_equal_batches():
    a, b = augmenting_sampler(7), augmenting_sampler(7)
    for _ in range(3):
        (ia, la), (ib, lb) = a.sample(), b.sample()
        assert torch.equal(ia, ib) and torch.equal(la, lb)


def test_different_seeds_give_different_batches():
    ia, _ = augmenting_sampler(7).sample()
    ib, _ = augmenting_sampler(8).sample()
    assert not torch.equal(ia, ib)


def test_augmented_labels_keep_input_label_values():
    sampler = augmenting_sampler(1, p_spatial=1.0)
    values = set()
    for _ in range(10):
        _, lab = sampler.sample()
        values |= set(lab.unique().tolist())
    # nearest sampling: no blended ids such as 2 between 1 and 3, and foreground does occur
    assert values <= {0, 1, 3}
    assert values & {1, 3}


def test_augmented_labels_stay_aligned_with_image():
    # image bright exactly where labelled, so a label cut under another transform would disagree
    label = box_label(SHAPE, [(FG_BOX, 1)])
    image = 0.2 + 0.6 * (label > 0).float()
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=4, patches_per_volume=4, pos=1.0, neg=0.0,
                        p_spatial=1.0, p_intensity=0.0)
    img, lab = PatchSampler([image], [label], cfg, seed=2).sample()
    fg = lab > 0
    assert fg.any()
    # bilinear blur only touches the box edge, so nearly all labelled voxels are bright
    assert float((img[:, 0][fg] > 0.5).float().mean()) > 0.9
    assert float((img[:, 0][~fg] < 0.5).float().mean()) > 0.9


def test_identity_augmentation_is_an_exact_crop():
    # augment on but both augmentations switched off: the context box and grid_sample must reduce to
    # a crop
    image = coordinate_volume(SHAPE)
    label = box_label(SHAPE, [(FG_BOX, 1)])
    cfg = SamplerConfig(
        patch=PATCH, volumes_per_batch=3, patches_per_volume=3, p_spatial=0.0, p_intensity=0.0
    )
    img, _ = PatchSampler([image], [label], cfg, seed=4).sample()
    for patch in img[:, 0]:
        x0, y0, z0 = locate(patch.round(), image, 1.0)
        crop = image[x0:x0 + PATCH[0], y0:y0 + PATCH[1], z0:z0 + PATCH[2]]
        torch.testing.assert_close(patch, crop, rtol=0, atol=1e-2)


def test_rotation_and_scaling_stay_inside_the_context_box():
    # a constant image and centres whose context boxes lie inside it: any sample taken from
    # outside the context box (grid_sample's zero padding) shows as < 1
    image = torch.ones(SHAPE)
    label = box_label(SHAPE, [((slice(15, 25), slice(14, 22), slice(12, 18)), 1)])
    cfg = SamplerConfig(
        patch=PATCH,
        volumes_per_batch=4,
        patches_per_volume=4,
        pos=1.0,
        neg=0.0,
        p_spatial=1.0,
        p_intensity=0.0,
    )
    sampler = PatchSampler([image], [label], cfg, seed=6)
    # the boxes above stay inside SHAPE with this margin
    assert sampler.margin.tolist() == [3, 3, 1]
    img, _ = sampler.sample()
    torch.testing.assert_close(img, torch.ones_like(img), rtol=0, atol=1e-5)


def test_augmented_patches_keep_their_centre_at_the_border():
    # an organ in a corner of the volume: with augmentation on (here the identity transform,
    # so the patch is a plain crop), a patch must still hold its centre voxel, and a patch
    # drawn on the organ must hold some of it, however close to the border the centre lies
    label = box_label(SHAPE, [((slice(0, 3), slice(0, 3), slice(0, 2)), 1)])
    image = coordinate_volume(SHAPE)
    cfg = SamplerConfig(
        patch=PATCH, volumes_per_batch=20, patches_per_volume=10, p_spatial=0.0, p_intensity=0.0
    )
    _, centre, want_fg = PatchSampler([image], [label], cfg, seed=11).centres()
    img, lab = PatchSampler([image], [label], cfg, seed=11).sample()
    assert want_fg.any() and not want_fg.all()
    for patch, patch_lab, c, fg in zip(img[:, 0], lab, centre, want_fg):
        value = image[c[0], c[1], c[2]]
        assert ((patch - value).abs() < 1e-2).any(), "the centre voxel must lie inside its patch"
        if fg:
            assert (patch_lab > 0).any()


def test_rotated_patches_at_the_border_read_zero_outside_the_volume():
    # a constant image, centres on the border: the part of a rotated patch past the border is 0,
    # the rest is the image (bilinear blending only at the border itself)
    image = torch.ones(SHAPE)
    label = box_label(SHAPE, [((slice(0, 1), slice(0, SHAPE[1]), slice(0, SHAPE[2])), 1)])
    cfg = SamplerConfig(
        patch=PATCH,
        volumes_per_batch=8,
        patches_per_volume=2,
        pos=1.0,
        neg=0.0,
        p_spatial=1.0,
        p_intensity=0.0,
        max_rotation_deg=15.0,
    )
    img, lab = PatchSampler([image], [label], cfg, seed=3).sample()
    assert (img == 0).any() and (img > 1 - 1e-5).float().mean() > 0.5
    assert (lab[img[:, 0] == 0] == 0).all()


def test_intensity_augmentation_scales_and_shifts_each_patch():
    image = torch.full(SHAPE, 0.5)
    label = box_label(SHAPE, [(FG_BOX, 1)])
    cfg = SamplerConfig(
        patch=PATCH, volumes_per_batch=4, patches_per_volume=4, p_spatial=0.0, p_intensity=1.0
    )
    sampler = PatchSampler([image], [label], cfg, seed=9)
    first, _ = sampler.sample()
    second, _ = sampler.sample()
    per_patch = first.flatten(1)
    # one scale and one shift per patch: constant within a patch, different between patches
    assert float((per_patch.max(1).values - per_patch.min(1).values).max()) < 1e-6
    assert per_patch[:, 0].unique().numel() > 1
    assert not torch.equal(first, second)
    # 0.5 * (1 +- 0.1) +- 0.1
    assert float(first.min()) >= 0.35 - 1e-6 and float(first.max()) <= 0.65 + 1e-6


def test_mismatched_images_and_labels_are_rejected():
    cfg = SamplerConfig(patch=PATCH)
    with pytest.raises(ValueError):
        PatchSampler([], [], cfg)
    with pytest.raises(ValueError):
        PatchSampler([torch.zeros(SHAPE)], [torch.zeros((40, 36, 29), dtype=torch.uint8)], cfg)


def test_binary_sampler_labels_and_multiclass_labels():
    label = torch.zeros(20, 20, 20, dtype=torch.uint8)
    label[5:10, 5:10, 5:10] = 3
    case = Case("c", torch.full((20, 20, 20), 100.0), label, (3.0, 3.0, 3.0))
    cfg = SamplerConfig(patch=(8, 8, 8), volumes_per_batch=1, patches_per_volume=4, augment=False)
    _, y = site_sampler([case], (-100, 200), True, cfg, "cpu", 0).sample()
    assert set(y.unique().tolist()) <= {0, 1} and (y == 1).any()
    _, y = site_sampler([case], (-100, 200), False, cfg, "cpu", 0).sample()
    assert set(y.unique().tolist()) <= {0, 3} and (y == 3).any()


# ---------------------------------------------------------------------------------------
# Where the sampler runs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, expected", [("mps", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"), ("cpu", "cpu")]
)
def test_the_sampler_stays_on_the_cpu_for_mps_only(device, expected):
    assert sampler_device(torch.device(device)) == torch.device(expected)
    assert sampler_device(device) == torch.device(expected)


def test_on_mps_the_sampler_is_built_on_the_cpu_and_its_batches_moved_to_the_device():
    label = torch.zeros(20, 20, 20, dtype=torch.uint8)
    label[5:10, 5:10, 5:10] = 1
    case = Case("c", torch.full((20, 20, 20), 100.0), label, (3.0, 3.0, 3.0))
    cfg = SamplerConfig(patch=(8, 8, 8), volumes_per_batch=1, patches_per_volume=2)
    source = site_sampler([case], (-100, 200), True, cfg, torch.device("mps"), 0)
    assert source.device == torch.device("cpu") and source.img.device.type == "cpu"
    # "meta" stands in for the MPS device here: any device the CPU batches must be moved to
    x, y = train.on_device(source.sample, torch.device("meta"))()
    assert x.device.type == "meta" and y.device.type == "meta"
    assert x.shape == (2, 1, 8, 8, 8) and x.is_contiguous(memory_format=torch.channels_last_3d)
    cpu_x, cpu_y = train.on_device(source.sample, "cpu")()
    assert cpu_x.device.type == "cpu" and cpu_y.dtype == torch.long
