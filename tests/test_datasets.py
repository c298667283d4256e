"""datasets.py's real datasets: every public layout, built from the one real CT, loads to the same
anatomy; resampling keeps organ volumes; predictions go back onto the original grid; the cache
is reused and invalidated; and each kind of bad input is named in one line."""

import gzip
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import archives
import datasets
import layouts
import predict
from archives import find_dataset, find_sources
from data import ORGAN_ID, DataError
from datasets import load_source
from eval import dice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(bool(layouts.MISSING), reason=layouts.MISSING)
NATIVE = (3.0, 3.0, 3.0)  # the CT's own spacing: loading must not change a voxel


@pytest.fixture(scope="module")
def reference():
    """The CT preprocessed straight from its R,A,S arrays: what every layout must reproduce."""
    hu, ts, affine = layouts.real_ct()
    organs = {"liver": [5], "spleen": [1], "pancreas": [7], "kidneys": [2, 3]}
    labels = {}
    for organ, ids in organs.items():
        raw = np.isin(ts, ids).astype(np.uint8)
        labels[organ] = datasets.preprocess_arrays(hu, affine, raw, None, ORGAN_ID[organ], NATIVE).label
    test_raw = layouts.relabel(ts, layouts.BTCV)
    test = datasets.preprocess_arrays(hu, affine, test_raw, find_test_map(), 0, NATIVE)
    return {"hu": test.hu, "labels": labels, "test": test.label}


def find_test_map():
    return archives.Source("test", "btcv", "", [], tuple(range(14))).label_map


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    layouts.data_root(base)
    layouts.nnunet_kits(base / "other")
    layouts.btcv_monai(base / "other")
    return base


LAYOUTS = [
    ("liver", "Task03_Liver", "msd"),
    ("spleen", "Task09_Spleen", "msd"),  # stored L,P,S
    ("pancreas", "Task07_Pancreas", "msd"),
    ("kidneys", "kits19", "kits19"),  # stored I,P,L
    ("kidneys", "other/nnUNet_raw_data/Task040_KiTS", "nnunet"),
    ("test", "Abdomen", "btcv"),
    ("test", "other/btcv_monai", "btcv-monai"),
]


@pytest.mark.parametrize("role, folder, layout", LAYOUTS)
def test_every_layout_loads_to_the_same_ras_array_and_label(role, folder, layout, root, reference):
    source = find_dataset(str(root / folder), role)
    assert source.layout == layout
    cases = load_source(source, NATIVE, cache_dir=None)
    assert len(cases) == (2 if layout == "btcv-monai" else 1)  # MONAI's training + validation lists
    case = cases[0]
    assert torch.equal(case.hu, reference["hu"]), "the image must come back in R,A,S order, voxel for voxel"
    expected = reference["test"] if role == "test" else reference["labels"][role]
    assert torch.equal(case.label, expected)
    if role == "liver":
        assert set(torch.unique(case.label).tolist()) == {0, ORGAN_ID["liver"]}, "tumour merges into the liver"


def test_macos_companions_and_unlabelled_cases_are_skipped(root):
    liver = find_dataset(str(root / "Task03_Liver"), "liver")
    assert [os.path.basename(p.image) for p in liver.pairs] == ["liver_0.nii.gz"]
    assert archives._niftis(str(root / "Task03_Liver" / "imagesTr")) == ["liver_0.nii.gz"]
    kits = find_dataset(str(root / "kits19"), "kidneys")
    assert [p.name for p in kits.pairs] == ["case_00000"]
    assert any("without segmentation" in n for n in kits.notes)
    btcv = find_dataset(str(root / "Abdomen"), "test")
    assert [p.name for p in btcv.pairs] == ["img0001"], "BTCV's Testing/ scans have no labels"


def test_data_root_finds_every_dataset(root):
    sources = find_sources(("liver", "spleen", "pancreas", "kidneys", "test"), str(root))
    assert {r: s.layout for r, s in sources.items()} == {
        "liver": "msd", "spleen": "msd", "pancreas": "msd", "kidneys": "kits19", "test": "btcv"}
    # a per-site override wins over --data-root
    other = find_sources(("kidneys",), str(root), {"kidneys": str(root / "other/nnUNet_raw_data/Task040_KiTS")})
    assert other["kidneys"].layout == "nnunet"


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 2.0), (2.0, 2.5, 4.0)])
def test_organ_volumes_survive_resampling(spacing, root):
    _, ts, _ = layouts.real_ct()
    source = find_dataset(str(root / "Abdomen"), "test")
    case = load_source(source, spacing, cache_dir=None)[0]
    voxel_after = float(np.prod(case.spacing))
    for organ, ids in {"liver": [5], "spleen": [1], "pancreas": [7], "kidneys": [2, 3]}.items():
        before = np.isin(ts, ids).sum() * 27.0
        after = int((case.label == ORGAN_ID[organ]).sum()) * voxel_after
        assert abs(after - before) / before < 0.05, (organ, before, after)
    assert all(abs(a - t) / t < 0.05 for a, t in zip(case.spacing, spacing))


@pytest.mark.parametrize("folder, role", [("Abdomen", "test"), ("kits19", "kidneys")])
def test_a_label_map_goes_back_onto_the_original_grid(folder, role, root, tmp_path):
    source = find_dataset(str(root / folder), role)
    case = load_source(source, archives.REAL_SPACING, cache_dir=None)[0]
    original = nib.load(source.pairs[0].label)
    truth = np.asanyarray(original.dataobj)
    if role == "test":
        back_ids = predict.to_btcv_ids(case.label)
        pairs = {"spleen": 1, "right kidney": 2, "left kidney": 3, "liver": 6, "pancreas": 11}
    else:
        back_ids = case.label.numpy()
        truth = (truth > 0).astype(np.uint8) * ORGAN_ID["kidneys"]  # tumour merged
        pairs = {"kidneys": ORGAN_ID["kidneys"]}
    out = tmp_path / "pred.nii.gz"
    predict.save_label_nifti(datasets.to_original_grid(back_ids, case.geometry), case.geometry, str(out))
    saved = nib.load(out)
    assert saved.shape == original.shape
    np.testing.assert_allclose(saved.affine, original.affine, atol=1e-5)
    assert nib.aff2axcodes(saved.affine) == nib.aff2axcodes(original.affine)
    back = np.asanyarray(saved.dataobj)
    for name, value in pairs.items():
        d = dice(torch.from_numpy(back == value), torch.from_numpy(truth == value))
        assert d >= 0.95, (name, d)


def test_the_cache_is_reused_and_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    base = layouts.msd_spleen(tmp_path / "data")
    source = find_dataset(str(base), "spleen")
    cache = tmp_path / "cache"
    first = load_source(source, NATIVE, str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 1 and not any(f.endswith(".tmp") for f in files)

    def refuse(*_):
        raise AssertionError("a cached case must not be preprocessed again")

    monkeypatch.setattr(datasets, "preprocess_pair", refuse)
    again = load_source(source, NATIVE, str(cache))
    assert torch.equal(again[0].hu, first[0].hu) and torch.equal(again[0].label, first[0].label)
    with pytest.raises(AssertionError, match="must not be preprocessed"):
        load_source(source, (2.0, 2.0, 2.0), str(cache))  # another spacing is another entry
    monkeypatch.undo()

    # rewrite the label with one voxel fewer: the next load must see the change
    label_path = source.pairs[0].label
    img = nib.load(label_path)
    arr = np.asanyarray(img.dataobj).copy()
    arr[tuple(np.argwhere(arr == 1)[0])] = 0
    nib.save(nib.Nifti1Image(arr, img.affine), label_path)
    os.utime(label_path, ns=(os.stat(label_path).st_atime_ns, os.stat(label_path).st_mtime_ns + 10**9))
    changed = load_source(source, NATIVE, str(cache))
    assert int(changed[0].label.sum()) == int(first[0].label.sum()) - ORGAN_ID["spleen"]
    assert len(os.listdir(cache)) == 2


def test_preprocessing_in_worker_processes_gives_the_same_cases(tmp_path):
    base = layouts.msd_pancreas(tmp_path / "data", cases=2)
    source = find_dataset(str(base), "pancreas")
    one = load_source(source, (4.0, 4.0, 4.0), str(tmp_path / "c1"), workers=1)
    two = load_source(source, (4.0, 4.0, 4.0), str(tmp_path / "c2"), workers=2)
    for a, b in zip(one, two):
        assert torch.equal(a.hu, b.hu) and torch.equal(a.label, b.label)


def test_validation_split_original_and_seeded():
    pairs = [archives.Pair(f"c{i:03d}", f"i{i}", f"l{i}") for i in range(40)]
    train, val, _ = datasets.split_validation(pairs, "spleen", "original")
    assert [p.name for p in val] == [f"c{i:03d}" for i in range(31, 40)] and len(train) == 31
    a = datasets.split_validation(pairs, "spleen", "0.25", seed=3)
    b = datasets.split_validation(pairs, "spleen", "0.25", seed=3)
    assert [p.name for p in a[1]] == [p.name for p in b[1]] and len(a[1]) == 10
    assert {p.name for p in a[0]}.isdisjoint(p.name for p in a[1])
    with pytest.raises(DataError, match="liver: 3 case"):
        datasets.split_validation(pairs[:3], "liver", "original")
    train, val, rule = datasets.split_validation(pairs, "spleen", "0")
    assert (len(train), val, rule) == (40, [], "every case trains, none held out")


def test_automatic_split_fits_the_folder():
    def names(n):
        return [archives.Pair(f"c{i:03d}", f"i{i}", f"l{i}") for i in range(n)]

    # the original archive (41 spleen cases): the original's last 9
    train, val, rule = datasets.split_validation(names(41), "spleen", "auto")
    assert [p.name for p in val] == [f"c{i:03d}" for i in range(32, 41)] and "original" in rule
    # a smaller hospital: a fifth, at least one, seeded
    for n, held in ((8, 2), (3, 1), (2, 1)):
        train, val, rule = datasets.split_validation(names(n), "liver", "auto", seed=1)
        assert (len(train), len(val)) == (n - held, held) and "fifth" in rule
        assert {p.name for p in train}.isdisjoint(p.name for p in val)
    assert datasets.split_validation(names(8), "liver", "auto", seed=1)[1] != datasets.split_validation(
        names(8), "liver", "auto", seed=2)[1]
    # one case: nothing to hold out, trains on it and says so
    train, val, rule = datasets.split_validation(names(1), "kidneys", "auto")
    assert len(train) == 1 and val == [] and "too few" in rule


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the file and the problem
# ---------------------------------------------------------------------------------------


def one_case(tmp_path, organ="spleen"):
    base = {"spleen": layouts.msd_spleen, "liver": layouts.msd_liver}[organ](tmp_path / "data")
    return base, find_dataset(str(base), organ)


def rewrite(path, array, affine=None):
    img = nib.load(path)
    nib.save(nib.Nifti1Image(array, img.affine if affine is None else affine), path)


def test_kidney_sides_follow_the_two_kidneys_not_the_middle_of_the_volume():
    # a body off the middle of the volume (a wide table): both kidneys lie at high x, the left
    # one (low x) right of the volume's middle; a small fragment beside the right kidney
    lab = np.zeros((60, 20, 10), np.uint8)
    k = ORGAN_ID["kidneys"]
    lab[34:40, 5:15, 2:8] = k  # left kidney
    lab[50:56, 5:15, 2:8] = k  # right kidney
    lab[58, 5, 2] = k  # a stray voxel, far right
    ids = predict.to_btcv_ids(torch.from_numpy(lab))
    right, left = predict.BTCV_RIGHT_KIDNEY, predict.BTCV_LEFT_KIDNEY
    assert (ids[34:40, 5:15, 2:8] == left).all() and (ids[50:56, 5:15, 2:8] == right).all() and ids[58, 5, 2] == right
    # one kidney alone (or two fragments that overlap in x) keeps the volume's middle
    one = np.zeros_like(lab)
    one[20:26, 5:15, 2:8] = k
    one[22:24, 16:18, 2:4] = k
    assert set(np.unique(predict.to_btcv_ids(torch.from_numpy(one)))) == {0, left}


def test_truncated_nifti(tmp_path):
    _, source = one_case(tmp_path)
    path = source.pairs[0].image
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"{path}: cannot be read as NIfTI"):
        load_source(source, NATIVE, str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == [], "nothing half-written in the cache"


def test_not_a_nifti_at_all(tmp_path):
    _, source = one_case(tmp_path)
    path = source.pairs[0].label
    with gzip.open(path, "wb") as f:
        f.write(b"plain text, not NIfTI")
    with pytest.raises(DataError, match=f"{path}: cannot be read as NIfTI"):
        load_source(source, NATIVE, None)


def test_image_and_label_of_different_shape(tmp_path):
    _, source = one_case(tmp_path)
    lab = np.asanyarray(nib.load(source.pairs[0].label).dataobj)
    rewrite(source.pairs[0].label, np.ascontiguousarray(lab[:-1]))
    with pytest.raises(DataError, match=r"shape .* differs from its image's"):
        load_source(source, NATIVE, None)


def test_image_and_label_of_different_affine(tmp_path):
    _, source = one_case(tmp_path)
    img = nib.load(source.pairs[0].label)
    shifted = img.affine.copy()
    shifted[0, 3] += 5.0
    rewrite(source.pairs[0].label, np.asanyarray(img.dataobj), shifted)
    with pytest.raises(DataError, match=f"{source.pairs[0].label}: affine differs"):
        load_source(source, NATIVE, None)


def test_a_label_whose_header_differs_only_by_rounding_or_says_nothing_lies_on_its_image(tmp_path):
    # headers written by other tools: an origin 0.05 mm off, axes rounded to float32; a label
    # with no qform or sform code (nibabel then reports a fall-back affine of its own)
    _, source = one_case(tmp_path)
    expected = load_source(source, NATIVE, None)[0]
    path = source.pairs[0].label
    img = nib.load(path)
    lab, near = np.asanyarray(img.dataobj), img.affine.copy()
    near[:3, 3] += 0.05
    near[:3, :3] = near[:3, :3].astype(np.float32)
    for affine, code in ((near, 1), (img.affine, 0)):
        out = nib.Nifti1Image(lab, affine)
        out.set_qform(affine, code=code)
        out.set_sform(affine, code=code)
        nib.save(out, path)
        assert torch.equal(load_source(source, NATIVE, None)[0].label, expected.label)
    # half a voxel off (the CT's voxels are 3 mm) is a different grid, and so is a voxel size
    # 1 % off: the far corner lies more than a voxel away
    far, stretched = img.affine.copy(), img.affine.copy()
    far[0, 3] += 1.5
    stretched[:3, 0] *= 1.01
    for affine in (far, stretched):
        rewrite(path, lab, affine)
        with pytest.raises(DataError, match=f"{path}: affine differs"):
            load_source(source, NATIVE, None)


def test_labels_stored_as_scaled_floats_are_rounded_and_fractions_refused(tmp_path):
    _, source = one_case(tmp_path)
    expected = load_source(source, NATIVE, None)[0]
    path = source.pairs[0].label
    lab = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    scaled = nib.Nifti1Image(lab * 0.996, nib.load(path).affine)  # reads back as 0.996: a scale factor's error
    nib.save(scaled, path)
    assert np.asanyarray(nib.load(path).dataobj).max() < 1
    assert torch.equal(load_source(source, NATIVE, None)[0].label, expected.label)
    lab[lab > 0] = 0.5
    rewrite(path, lab)
    with pytest.raises(DataError, match=f"{path}: label values are not integers"):
        load_source(source, NATIVE, None)


@pytest.mark.parametrize("shape, dims", [((64, 64), "2-D"), ((16, 16, 8, 2), "4-D")])
def test_volume_that_is_not_3d(shape, dims, tmp_path):
    _, source = one_case(tmp_path)
    rewrite(source.pairs[0].image, np.zeros(shape, np.int16))
    with pytest.raises(DataError, match=f"{source.pairs[0].image}: a {dims} volume"):
        load_source(source, NATIVE, None)


def test_image_and_label_with_a_singular_affine(tmp_path):
    # a scanner header whose slice axis is zero: nothing to orient the volume by
    _, source = one_case(tmp_path)
    flat = np.diag([0.8, 0.8, 0.0, 1.0])
    for path in (source.pairs[0].label, source.pairs[0].image):
        img = nib.Nifti1Image(np.asanyarray(nib.load(path).dataobj), None)
        img.set_sform(flat, code=1)  # nibabel will not write a singular qform; a sform it will
        nib.save(img, path)
    with pytest.raises(DataError, match=f"{source.pairs[0].image}: no usable affine"):
        load_source(source, NATIVE, None)


def test_nan_voxels(tmp_path):
    _, source = one_case(tmp_path)
    img = np.asanyarray(nib.load(source.pairs[0].image).dataobj).astype(np.float32)
    img[5, 5, 5] = np.nan
    img[6, 6, 6] = np.inf
    rewrite(source.pairs[0].image, img)
    with pytest.raises(DataError, match="2 NaN or inf voxel"):
        load_source(source, NATIVE, None)


def test_label_values_not_declared(tmp_path):
    _, source = one_case(tmp_path)
    lab = np.asanyarray(nib.load(source.pairs[0].label).dataobj).copy()
    lab[0, 0, 0] = 7
    rewrite(source.pairs[0].label, lab)
    with pytest.raises(DataError, match=r"label value\(s\) \[7\] not declared"):
        load_source(source, NATIVE, None)


def test_site_with_no_labelled_voxel(tmp_path):
    _, source = one_case(tmp_path)
    lab = np.asanyarray(nib.load(source.pairs[0].label).dataobj)
    rewrite(source.pairs[0].label, np.zeros_like(lab))
    cases = load_source(source, NATIVE, None)
    with pytest.raises(DataError, match="no voxel of the spleen is labelled"):
        datasets.check_labelled(cases, source)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        find_dataset(str(tmp_path / "empty"), "liver")
    with pytest.raises(DataError, match="no such folder"):
        find_dataset(str(tmp_path / "nowhere"), "liver")


def test_dataset_json_naming_missing_files(tmp_path):
    base, _ = one_case(tmp_path)
    os.remove(base / "labelsTr" / "spleen_0.nii.gz")
    source = find_dataset(str(base), "spleen")
    with pytest.raises(DataError, match=r"dataset\.json names .*spleen_0\.nii\.gz, which does not exist"):
        load_source(source, NATIVE, None)


def test_data_root_with_none_of_the_datasets(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match=r"none of the expected datasets found .*Task03_Liver.*kits19"):
        find_sources(("liver", "spleen", "pancreas", "kidneys", "test"), str(tmp_path))


def test_data_root_missing_one_dataset_says_which(tmp_path):
    layouts.msd_liver(tmp_path)
    with pytest.raises(DataError, match=r"no dataset for spleen .*Task09_Spleen"):
        find_sources(("liver", "spleen", "test"), str(tmp_path), {"test": "x"})


# ---------------------------------------------------------------------------------------
# python datasets.py inspect
# ---------------------------------------------------------------------------------------


def test_inspect_reports_every_site_and_problems(root, tmp_path):
    r = subprocess.run([sys.executable, "datasets.py", "inspect", "--data-root", str(root), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    reports = {x["role"]: x for x in json.loads(r.stdout)}
    assert set(reports) == {"liver", "spleen", "pancreas", "kidneys", "test"}
    assert reports["kidneys"]["axis_codes"] == {"IPL": 1}
    assert reports["spleen"]["axis_codes"] == {"LPS": 1}
    assert reports["liver"]["label_voxels"]["2"] > 0  # the tumour label is seen before merging
    assert reports["test"]["shapes"] == {"122x101x112": 1}
    assert all(not x["problems"] for x in reports.values())

    # a broken copy: the problem is printed and the exit status says so
    broken = tmp_path / "broken"
    base = layouts.msd_spleen(broken)
    os.remove(base / "imagesTr" / "spleen_0.nii.gz")
    r = subprocess.run([sys.executable, "datasets.py", "inspect", "--data", f"spleen={base}", "--nodes", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "spleen_0.nii.gz, which does not exist" in r.stdout
    assert "no liver dataset found" in r.stdout
