"""Tests of data.py: the patch sampler, the phantom's anatomy and labels, window() and resample()."""

import math

import numpy as np
import pytest
import torch

import data
from data import ORGAN_ID, PatchSampler, SamplerConfig

# ---------------------------------------------------------------------------------------
# PatchSampler
# ---------------------------------------------------------------------------------------

SHAPE = (40, 36, 30)
PATCH = (16, 16, 8)
FG_BOX = (slice(10, 18), slice(12, 20), slice(8, 14))


def coordinate_volume(shape, base=1.0):
    """An image whose value is `base` + the voxel's flat index, so a patch reveals where it came from.

    Values start at 1 so that every voxel counts as body (> 0) for background candidates.
    """
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + base


def box_label(shape, boxes):
    lab = torch.zeros(shape, dtype=torch.uint8)
    for box, value in boxes:
        lab[box] = value
    return lab


def locate(patch, image, base):
    """Start (x0, y0, z0) of the crop of `image` that `patch` would be, read from its first voxel."""
    _, sy, sz = image.shape
    flat = int(patch[0, 0, 0].item() - base)
    return flat // (sy * sz), (flat // sz) % sy, flat % sz


def assert_exact_crop(patch, image, base):
    x0, y0, z0 = locate(patch, image, base)
    px, py, pz = patch.shape
    sx, sy, sz = image.shape
    assert 0 <= x0 <= sx - px and 0 <= y0 <= sy - py and 0 <= z0 <= sz - pz, "patch leaves the volume"
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
            assert torch.equal(patch_lab, labels[v][x0:x0 + PATCH[0], y0:y0 + PATCH[1], z0:z0 + PATCH[2]].long())
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
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=50, patches_per_volume=40, pos=pos, neg=neg, augment=False)
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
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=10, patches_per_volume=10, pos=1.0, neg=0.0, augment=False)
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
        assert (patch == image[c[0], c[1], c[2]]).any(), "the centre voxel must lie inside its patch"
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


def test_noise_augmentation_adds_zero_mean_noise_of_at_most_the_set_std():
    label = box_label(SHAPE, [(FG_BOX, 1)])
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=8, patches_per_volume=4, p_spatial=0.0, p_intensity=0.0,
                        p_contrast=0.0, p_noise=1.0, noise_std=0.05)
    img, _ = PatchSampler([torch.full(SHAPE, 0.5)], [label], cfg, seed=5).sample()
    std = img.std(dim=(1, 2, 3, 4))
    assert (std > 0).all() and (std < 0.05 * 1.05).all() and std.max() > 0.02  # std drawn from U(0, 0.05)
    assert abs(float(img.mean()) - 0.5) < 0.01


def test_contrast_augmentation_scales_about_the_patch_mean():
    # two levels in every patch: their difference must scale by one factor in [0.75, 1.25], mean kept
    label = box_label(SHAPE, [(FG_BOX, 1)])
    image = (0.2 + 0.6 * (torch.arange(SHAPE[2]) % 2).float()).expand(SHAPE).clone()  # stripes along z
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=8, patches_per_volume=4, p_spatial=0.0, p_intensity=0.0,
                        p_noise=0.0, p_contrast=1.0, contrast=0.25)
    img, _ = PatchSampler([image], [label], cfg, seed=6).sample()
    spread = img.amax(dim=(1, 2, 3, 4)) - img.amin(dim=(1, 2, 3, 4))
    factor = spread / 0.6
    assert ((factor > 0.75 - 1e-4) & (factor < 1.25 + 1e-4)).all() and factor.std() > 0.05
    assert torch.allclose(img.mean(dim=(1, 2, 3, 4)), torch.full((32,), 0.5), atol=0.05)


def test_identity_augmentation_is_an_exact_crop():
    # augment on but both augmentations switched off: the context box and grid_sample must reduce to a crop
    image = coordinate_volume(SHAPE)
    label = box_label(SHAPE, [(FG_BOX, 1)])
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=3, patches_per_volume=3, p_spatial=0.0, p_intensity=0.0)
    img, _ = PatchSampler([image], [label], cfg, seed=4).sample()
    for patch in img[:, 0]:
        x0, y0, z0 = locate(patch.round(), image, 1.0)
        crop = image[x0:x0 + PATCH[0], y0:y0 + PATCH[1], z0:z0 + PATCH[2]]
        torch.testing.assert_close(patch, crop, rtol=0, atol=1e-2)


def test_rotation_and_scaling_stay_inside_the_context_box():
    # a constant image: any sample taken from the zero padding outside the context box shows as < 1
    image = torch.ones(SHAPE)
    label = box_label(SHAPE, [(FG_BOX, 1)])
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=4, patches_per_volume=4, p_spatial=1.0, p_intensity=0.0)
    img, _ = PatchSampler([image], [label], cfg, seed=6).sample()
    torch.testing.assert_close(img, torch.ones_like(img), rtol=0, atol=1e-5)


def test_intensity_augmentation_scales_and_shifts_each_patch():
    image = torch.full(SHAPE, 0.5)
    label = box_label(SHAPE, [(FG_BOX, 1)])
    cfg = SamplerConfig(patch=PATCH, volumes_per_batch=4, patches_per_volume=4, p_spatial=0.0, p_intensity=1.0)
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


# ---------------------------------------------------------------------------------------
# The phantom
# ---------------------------------------------------------------------------------------

SPACING = (3.0, 3.0, 3.0)
TEST_SEED = 2  # its one test case has liver tumours, so the merge of raw label 5 is exercised
KIDNEY_SEED = 5
VENOUS_HU = (60.0, 160.0)


def grid_axes(site, shape):
    """Voxel-centre coordinates (mm, RAS) of a site's acquisition grid."""
    acq = data.ACQUISITIONS[site]
    x = (np.arange(shape[0]) + 0.5) * acq.inplane - acq.fov_mm / 2
    y = (np.arange(shape[1]) + 0.5) * acq.inplane - acq.fov_mm / 2
    z = (np.arange(shape[2]) + 0.5) * acq.slice_mm + acq.z_range[0]
    return x, y, z


def organ_coords(lab, site, organ):
    """x, y, z (mm) of every voxel labelled as `organ`."""
    i, j, k = np.nonzero(lab.numpy() == ORGAN_ID[organ])
    x, y, z = grid_axes(site, lab.shape)
    return x[i], y[j], z[k]


def volume_mm3(lab, spacing, value):
    return int((lab == value).sum()) * math.prod(spacing)


@pytest.fixture(scope="module")
def test_site():
    """The one test-site case: as generated by phantom_case (acquisition grid) and as preprocessed."""
    generated = []
    real = data.phantom_case

    def recording(seed, site):
        generated.append(real(seed, site))
        return generated[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "phantom_case", recording)
        (case,) = data.phantom_cases("test", 1, TEST_SEED, SPACING)
    (raw,) = generated
    return raw, case


@pytest.fixture(scope="module")
def raw_test(test_site):
    return test_site[0]


@pytest.fixture(scope="module")
def raw_kidneys():
    return data.phantom_case(KIDNEY_SEED, "kidneys")


def test_phantom_case_shapes_dtypes_and_spacing(raw_test):
    hu, lab, spacing = raw_test
    acq = data.ACQUISITIONS["test"]
    nxy = round(acq.fov_mm / acq.inplane)
    nz = round((acq.z_range[1] - acq.z_range[0]) / acq.slice_mm)
    assert hu.shape == lab.shape == (nxy, nxy, nz)
    assert hu.dtype == torch.float32 and lab.dtype == torch.uint8
    assert spacing == (acq.inplane, acq.inplane, acq.slice_mm)


def test_liver_is_on_patient_right(raw_test):
    x, _, _ = organ_coords(raw_test[1], "test", "liver")
    assert x.mean() > 0  # RAS: +x is the patient's right


def test_spleen_is_left_and_posterior(raw_test):
    x, y, _ = organ_coords(raw_test[1], "test", "spleen")
    assert x.mean() < 0 and y.mean() < 0


def test_kidneys_are_two_posterior_organs_either_side_of_the_spine(raw_test):
    x, y, _ = organ_coords(raw_test[1], "test", "kidneys")
    assert (x > 0).any() and (x < 0).any()
    # nothing near the midline (the vertebral body lies between them): two separate organs
    assert np.abs(x).min() > 15
    assert y.mean() < 0
    for side in (x > 0, x < 0):
        assert y[side].mean() < 0


def test_pancreas_is_anterior_to_the_kidneys(raw_test):
    _, y_pancreas, _ = organ_coords(raw_test[1], "test", "pancreas")
    _, y_kidneys, _ = organ_coords(raw_test[1], "test", "kidneys")
    assert y_pancreas.mean() > y_kidneys.mean()


def test_organ_volumes_are_ordered_liver_spleen_pancreas(raw_test):
    _, lab, spacing = raw_test
    liver = volume_mm3(lab, spacing, ORGAN_ID["liver"]) + volume_mm3(lab, spacing, 5)
    spleen = volume_mm3(lab, spacing, ORGAN_ID["spleen"])
    pancreas = volume_mm3(lab, spacing, ORGAN_ID["pancreas"])
    assert liver > spleen > pancreas > 0
    # plausible adult sizes: liver over a litre, pancreas tens of millilitres
    assert liver > 1e6 and 1e4 < pancreas < 2e5


def mean_hu(raw, organ):
    hu, lab, _ = raw
    return float(hu[lab == ORGAN_ID[organ]].mean())


def test_labels_exclude_bone_painted_over_organs(raw_test):
    # vessels and spine are drawn after the organs; the label must drop what they overwrote,
    # so only partial-volume and noise tails of labelled voxels reach bone-like HU (cortical bone ~700)
    hu, lab, _ = raw_test
    labelled = hu[lab > 0]
    assert float(labelled.max()) < 550
    assert float((labelled > 300).float().mean()) < 0.005


@pytest.mark.parametrize("organ", ["liver", "spleen", "pancreas"])
def test_venous_organ_hu_is_plausible(raw_test, organ):
    lo, hi = VENOUS_HU
    assert lo <= mean_hu(raw_test, organ) <= hi


def test_liver_spleen_pancreas_are_not_separable_by_intensity(raw_test):
    means = [mean_hu(raw_test, o) for o in ("liver", "spleen", "pancreas")]
    assert max(means) - min(means) < 50


def test_kidneys_enhance_above_liver_in_arterial_phase(raw_kidneys):
    assert data.ACQUISITIONS["kidneys"].phase == "arterial"
    assert mean_hu(raw_kidneys, "kidneys") > mean_hu(raw_kidneys, "liver") + 30


def test_phantom_case_is_deterministic_for_a_seed(raw_kidneys):
    hu, lab, spacing = data.phantom_case(KIDNEY_SEED, "kidneys")
    assert torch.equal(hu, raw_kidneys[0]) and torch.equal(lab, raw_kidneys[1]) and spacing == raw_kidneys[2]


def test_phantom_case_differs_across_seeds(raw_kidneys):
    hu, lab, _ = data.phantom_case(KIDNEY_SEED + 1, "kidneys")
    assert not torch.equal(hu, raw_kidneys[0])
    assert not torch.equal(lab, raw_kidneys[1])


def test_site_case_labels_only_its_organ():
    (case,) = data.phantom_cases("spleen", 1, 0, SPACING)
    values = set(case.label.unique().tolist())
    assert values == {0, ORGAN_ID["spleen"]}
    assert case.spacing == SPACING and case.hu.shape == case.label.shape


@pytest.mark.parametrize("site", ["liver", "spleen", "pancreas", "kidneys"])
def test_site_label_keeps_exactly_the_site_organ(raw_test, site):
    raw = raw_test[1]
    out = data.site_label(raw, site)
    organ = ORGAN_ID[site]
    kept = (raw == organ) | ((raw == 5) if site == "liver" else torch.zeros_like(raw, dtype=torch.bool))
    assert set(out.unique().tolist()) == {0, organ}
    assert torch.equal(out == organ, kept)


def test_raw_phantom_marks_liver_tumours_inside_the_liver(raw_test):
    lab = raw_test[1]
    # fixture seed chosen to have tumours; otherwise the merge tests below would be vacuous
    assert (lab == 5).any()


def test_test_case_has_all_four_organs_with_tumours_merged_into_liver(test_site):
    (_, raw, raw_spacing), case = test_site
    assert set(case.label.unique().tolist()) == {0, *ORGAN_ID.values()}
    # the tumour voxels became liver: liver volume matches raw liver + tumour, not raw liver alone
    raw_liver = volume_mm3(raw, raw_spacing, ORGAN_ID["liver"]) + volume_mm3(raw, raw_spacing, 5)
    liver = volume_mm3(case.label, SPACING, ORGAN_ID["liver"])
    assert abs(liver / raw_liver - 1) < 0.05


def test_phantom_cases_are_deterministic_and_seed_dependent(test_site):
    _, case = test_site
    (again,) = data.phantom_cases("test", 1, TEST_SEED, SPACING)
    (other,) = data.phantom_cases("test", 1, TEST_SEED + 1, SPACING)
    assert torch.equal(again.hu, case.hu) and torch.equal(again.label, case.label)
    assert again.hu.shape != other.hu.shape or not torch.equal(other.hu, case.hu)


# ---------------------------------------------------------------------------------------
# window() and resample()
# ---------------------------------------------------------------------------------------


def test_window_maps_lo_to_0_hi_to_1_and_clips():
    lo, hi = data.WINDOWS["liver"]
    hu = torch.tensor([lo - 500, lo, (lo + hi) / 2, hi, hi + 500])
    out = data.window(hu, (lo, hi))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert hu[0] == lo - 500  # the input is left alone


def test_window_is_linear_inside():
    out = data.window(torch.tensor([-100.0, 0.0, 100.0, 200.0]), (-200.0, 200.0))
    torch.testing.assert_close(out, torch.tensor([0.25, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize("organ", ["liver", "spleen", "kidneys"])
def test_resample_preserves_organ_volume_and_position(raw_test, organ):
    hu, lab, spacing = raw_test
    img, out = data.resample(hu, lab, spacing, SPACING)
    assert img.shape == out.shape and out.dtype == torch.uint8
    # both grids span the same physical extent, so the effective spacing is extent / size
    extent = [n * s for n, s in zip(lab.shape, spacing)]
    new_spacing = [e / m for e, m in zip(extent, out.shape)]
    assert all(abs(s - t) / t < 0.02 for s, t in zip(new_spacing, SPACING))
    before = volume_mm3(lab, spacing, ORGAN_ID[organ])
    after = volume_mm3(out, new_spacing, ORGAN_ID[organ])
    assert abs(after / before - 1) < 0.05
    # the centroid moves by less than one voxel (physical coordinates relative to the grid's first edge)
    old = np.argwhere(lab.numpy() == ORGAN_ID[organ]).mean(0) + 0.5
    new = np.argwhere(out.numpy() == ORGAN_ID[organ]).mean(0) + 0.5
    assert np.all(np.abs(old * spacing - new * new_spacing) < max(SPACING))


def test_resample_labels_take_only_input_values(raw_test):
    hu, lab, spacing = raw_test
    _, out = data.resample(hu, lab, spacing, SPACING)
    assert set(out.unique().tolist()) <= set(lab.unique().tolist())


# ---------------------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------------------


def test_write_atomic_replaces_whole_files_and_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "state.pt"
    data.write_atomic(str(path), lambda tmp: torch.save({"round": 1}, tmp))
    assert torch.load(path, weights_only=True) == {"round": 1}

    def dies_half_way(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        data.write_atomic(str(path), dies_half_way)
    assert torch.load(path, weights_only=True) == {"round": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind
