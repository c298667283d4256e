"""Build the public datasets' folder layouts from a real CT (../shared beside the checkout, or
$SEGVIZ_REAL_CT), at test time.

The CT is stored R,A,S at 3 mm with TotalSegmentator labels (1 spleen, 2 right kidney,
3 left kidney, 5 liver, 7 pancreas). Each builder writes what the official archive would
hold for one site: its own label values, its own array order and affine where the real
dataset has them (KiTS19: I,P,L), and the clutter users meet (macOS "._" files).
"""

from __future__ import annotations

import json
import os
import pathlib

import nibabel as nib
import numpy as np

# ../shared beside the checkout (the project's read-only data), or $SEGVIZ_REAL_CT
CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
REAL_CT = pathlib.Path(
    os.environ.get("SEGVIZ_REAL_CT", CHECKOUT.parent / "shared" / "data" / "real_ct")
)
MISSING = (
    ""
    if (REAL_CT / "ct.nii.gz").is_file()
    else (
        f"the real CT is not at {REAL_CT} (../shared beside the checkout); set SEGVIZ_REAL_CT to "
        "its folder"
    )
)
TS = {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 5, "pancreas": 7}
BTCV = {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6, "pancreas": 11}


def real_ct() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU array, TotalSegmentator label array (both R,A,S) and the affine."""
    img = nib.load(REAL_CT / "ct.nii.gz")
    lab = nib.load(REAL_CT / "labels_totalsegmentator.nii.gz")
    return np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj), img.affine


def relabel(ts: np.ndarray, mapping: dict[str, int]) -> np.ndarray:
    """TotalSegmentator ids -> another dataset's ids (structures not named become 0)."""
    out = np.zeros(ts.shape, np.uint8)
    for name, value in mapping.items():
        out[ts == TS[name]] = value
    return out


def tumour_inside(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """A small ball inside an organ mask, to stand in for the datasets' tumour label."""
    idx = np.argwhere(mask)
    centre = idx[np.random.default_rng(seed).integers(len(idx))]
    grid = np.indices(mask.shape).transpose(1, 2, 3, 0)
    return (np.linalg.norm(grid - centre, axis=-1) <= 2.5) & mask


def reoriented(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same volume stored in another array order (axis codes), with the matching affine."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(tuple(codes)))
    out = nib.orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)


def save(path, data: np.ndarray, affine: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def mac_junk(folder) -> None:
    """The '._' companions of macOS archives: named like NIfTI, not NIfTI."""
    for name in os.listdir(folder):
        if name.endswith(".nii.gz"):
            (pathlib.Path(folder) / f"._{name}").write_bytes(
                b"\x00\x05\x16\x07 Mac OS X resource fork"
            )


def msd(
    root, task: str, organ: str, labels: dict, cases: int = 1, codes: str = "RAS"
) -> pathlib.Path:
    """An MSD task folder: dataset.json, imagesTr/, labelsTr/, imagesTs/, with '._' files."""
    hu, ts, affine = real_ct()
    base = pathlib.Path(root) / task
    short = task.split("_")[1].lower()
    lab = relabel(ts, {organ: 1} if organ != "kidneys" else {"right_kidney": 1, "left_kidney": 1})
    if "2" in labels:  # the dataset's tumour label
        lab[tumour_inside(lab == 1)] = 2
    training = []
    for i in range(cases):
        img_a, aff = reoriented(hu.astype(np.int16), affine, codes)
        lab_a, _ = reoriented(lab, affine, codes)
        save(base / "imagesTr" / f"{short}_{i}.nii.gz", img_a, aff)
        save(base / "labelsTr" / f"{short}_{i}.nii.gz", lab_a, aff)
        training.append(
            {"image": f"./imagesTr/{short}_{i}.nii.gz", "label": f"./labelsTr/{short}_{i}.nii.gz"}
        )
    save(base / "imagesTs" / f"{short}_99.nii.gz", hu.astype(np.int16), affine)
    mac_junk(base / "imagesTr")
    mac_junk(base / "labelsTr")
    meta = {"name": short, "labels": labels, "numTraining": cases, "training": training,
            "test": [f"./imagesTs/{short}_99.nii.gz"]}
    (base / "dataset.json").write_text(json.dumps(meta))
    return base


def msd_liver(root, cases=1, codes="RAS"):
    return msd(
        root,
        "Task03_Liver",
        "liver",
        {"0": "background", "1": "liver", "2": "cancer"},
        cases,
        codes,
    )


def msd_spleen(root, cases=1, codes="LPS"):
    return msd(root, "Task09_Spleen", "spleen", {"0": "background", "1": "spleen"}, cases, codes)


def msd_pancreas(root, cases=1, codes="RAS"):
    return msd(
        root,
        "Task07_Pancreas",
        "pancreas",
        {"0": "background", "1": "pancreas", "2": "cancer"},
        cases,
        codes,
    )


def kidney_labels() -> np.ndarray:
    _, ts, _ = real_ct()
    lab = relabel(ts, {"right_kidney": 1, "left_kidney": 1})
    lab[tumour_inside(lab == 1)] = 2
    return lab


def kits19(root, cases: int = 1) -> pathlib.Path:
    """kits19/data/case_XXXXX/{imaging,segmentation}.nii.gz stored (slices, H, W): axis codes I,P,L;
    one more case without segmentation, as KiTS19's test cases."""
    hu, _, affine = real_ct()
    lab = kidney_labels()
    base = pathlib.Path(root) / "kits19" / "data"
    img_a, aff = reoriented(hu.astype(np.float32), affine, "IPL")
    lab_a, _ = reoriented(lab, affine, "IPL")
    for i in range(cases):
        save(base / f"case_{i:05d}" / "imaging.nii.gz", img_a, aff)
        save(base / f"case_{i:05d}" / "segmentation.nii.gz", lab_a, aff)
    save(base / "case_00210" / "imaging.nii.gz", img_a, aff)
    return base.parent


def nnunet_kits(root) -> pathlib.Path:
    """nnU-Net v1's Task040_KiTS: imagesTr/case_XXXXX_0000.nii.gz, labelsTr/case_XXXXX.nii.gz."""
    hu, _, affine = real_ct()
    base = pathlib.Path(root) / "nnUNet_raw_data" / "Task040_KiTS"
    img_a, aff = reoriented(hu.astype(np.int16), affine, "IPL")
    lab_a, _ = reoriented(kidney_labels(), affine, "IPL")
    save(base / "imagesTr" / "case_00000_0000.nii.gz", img_a, aff)
    save(base / "labelsTr" / "case_00000.nii.gz", lab_a, aff)
    meta = {
        "name": "KiTS",
        "labels": {"0": "background", "1": "Kidney", "2": "Tumor"},
        "numTraining": 1,
        "training": [
            {"image": "./imagesTr/case_00000.nii.gz", "label": "./labelsTr/case_00000.nii.gz"}
        ],
        "test": [],
    }
    (base / "dataset.json").write_text(json.dumps(meta))
    return base


def btcv_raw(root, cases: int = 1) -> pathlib.Path:
    """BTCV as distributed: Abdomen/RawData/Training/{img,label}/, and unlabelled Testing/img/."""
    hu, ts, affine = real_ct()
    base = pathlib.Path(root) / "Abdomen" / "RawData"
    lab = relabel(ts, BTCV)
    for i in range(1, cases + 1):
        save(base / "Training" / "img" / f"img{i:04d}.nii.gz", hu.astype(np.int16), affine)
        save(base / "Training" / "label" / f"label{i:04d}.nii.gz", lab, affine)
    save(base / "Testing" / "img" / "img0061.nii.gz", hu.astype(np.int16), affine)
    return pathlib.Path(root) / "Abdomen"


def btcv_monai(root) -> pathlib.Path:
    """MONAI's renamed BTCV: imagesTr/, labelsTr/ and dataset_0.json with training/validation lists.
    """
    hu, ts, affine = real_ct()
    base = pathlib.Path(root) / "btcv_monai"
    lab = relabel(ts, BTCV)
    for i in (1, 2):
        save(base / "imagesTr" / f"img{i:04d}.nii.gz", hu.astype(np.int16), affine)
        save(base / "labelsTr" / f"label{i:04d}.nii.gz", lab, affine)
    meta = {
        "labels": {str(i): f"organ{i}" for i in range(14)},
        "training": [{"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}],
        "validation": [{"image": "imagesTr/img0002.nii.gz", "label": "labelsTr/label0002.nii.gz"}],
    }
    (base / "dataset_0.json").write_text(json.dumps(meta))
    return base


def data_root(root, cases: int = 1) -> pathlib.Path:
    """A --data-root with every dataset the paper used, as the archives unpack."""
    root = pathlib.Path(root)
    msd_liver(root, cases)
    msd_spleen(root, cases)
    msd_pancreas(root, cases)
    kits19(root, cases)
    btcv_raw(root, cases)
    return root
