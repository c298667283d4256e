"""Real scans to the working grid: every public layout, built from the one real CT, loads to the
same anatomy; resampling keeps organ volumes; predictions go back onto the original grid; the
cache is reused and invalidated, also by worker processes."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch

import layouts
from data import ORGAN_ID
from metrics import dice
from realdata import archives, preprocess
from realdata.archives import REAL_SPACING, find_dataset, find_sources
from realdata.nifti import save_label_nifti
from realdata.predict import to_btcv_ids
from realdata.preprocess import load_source

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
        labels[organ] = preprocess.preprocess_arrays(
            hu, affine, raw, None, ORGAN_ID[organ], NATIVE
        ).label
    test_raw = layouts.relabel(ts, layouts.BTCV)
    test = preprocess.preprocess_arrays(hu, affine, test_raw, find_test_map(), 0, NATIVE)
    return {"hu": test.hu, "labels": labels, "test": test.label}


def find_test_map():
    return archives.Source("test", "btcv", "", [], tuple(range(14))).label_map


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
    assert torch.equal(case.hu, reference["hu"]), (
        "the image must come back in R,A,S order, voxel for voxel"
    )
    expected = reference["test"] if role == "test" else reference["labels"][role]
    assert torch.equal(case.label, expected)
    if role == "liver":
        assert set(torch.unique(case.label).tolist()) == {0, ORGAN_ID["liver"]}, (
            "tumour merges into the liver"
        )


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
    other = find_sources(
        ("kidneys",), str(root), {"kidneys": str(root / "other/nnUNet_raw_data/Task040_KiTS")}
    )
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
    case = load_source(source, REAL_SPACING, cache_dir=None)[0]
    original = nib.load(source.pairs[0].label)
    truth = np.asanyarray(original.dataobj)
    if role == "test":
        back_ids = to_btcv_ids(case.label)
        pairs = {"spleen": 1, "right kidney": 2, "left kidney": 3, "liver": 6, "pancreas": 11}
    else:
        back_ids = case.label.numpy()
        truth = (truth > 0).astype(np.uint8) * ORGAN_ID["kidneys"]  # tumour merged
        pairs = {"kidneys": ORGAN_ID["kidneys"]}
    out = tmp_path / "pred.nii.gz"
    save_label_nifti(preprocess.to_original_grid(back_ids, case.geometry), case.geometry, str(out))
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

    monkeypatch.setattr(preprocess, "preprocess_pair", refuse)
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
    os.utime(
        label_path, ns=(os.stat(label_path).st_atime_ns, os.stat(label_path).st_mtime_ns + 10**9)
    )
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
