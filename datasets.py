"""Real datasets: the public layouts (MSD, KiTS19, nnU-Net, BTCV) found on disk, NIfTI reading
and checks, preprocessing to the working grid (and back to the original grid), the on-disk cache
of preprocessed cases, the validation split, the command-line flags that point at real data, and
`python datasets.py inspect`, which checks a download before a long run.

The only module that imports nibabel.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import write_atomic
from data import NODE_SITES, ORGAN_ID, ORGANS, SITE_ORGAN, Case, DataError, body_box

# ---------------------------------------------------------------------------------------
# Real datasets, read from the public archives as they unpack
# ---------------------------------------------------------------------------------------
#
# A site's folder is recognised by what it holds, in this order:
#   dataset.json                  MSD (Task03_Liver, Task09_Spleen, Task07_Pancreas) or nnU-Net
#                                 (Task040_KiTS: images named x_0000.nii.gz)
#   dataset_0.json                MONAI's renamed BTCV (imagesTr/, labelsTr/)
#   [data/]case_XXXXX/            KiTS19 (imaging.nii.gz, segmentation.nii.gz)
#   imagesTr/ + labelsTr/         the same folders without a JSON file
#   .../img/imgNNNN.nii.gz + .../label/labelNNNN.nii.gz   BTCV as distributed, anywhere below
#
# Every volume is reoriented to RAS from its affine (never from the array order: KiTS19
# stores (slices, H, W) under an affine that permutes and flips the axes), resampled to
# the working spacing (linear for images, nearest for labels) and cropped to the body, as
# the phantom is. What was done is kept with the case (`Case.geometry`) so a prediction can
# be put back on the original grid.


# BTCV's label ids for the four organs (kidneys: right 2, left 3); all other ids are background.
BTCV_IDS = {"liver": (6,), "spleen": (1,), "pancreas": (11,), "kidneys": (2, 3)}
BTCV_RIGHT_KIDNEY, BTCV_LEFT_KIDNEY = 2, 3

# The folder names each dataset is looked for under --data-root.
ROOT_NAMES = {"liver": ("Task03_Liver",), "spleen": ("Task09_Spleen",), "pancreas": ("Task07_Pancreas",),
              "kidneys": ("kits19", "Task040_KiTS"), "test": ("BTCV", "btcv", "Abdomen")}
LOOKED_FOR = {"liver": "Task03_Liver/", "spleen": "Task09_Spleen/", "pancreas": "Task07_Pancreas/",
              "kidneys": "kits19/ or Task040_KiTS/",
              "test": "BTCV (img/ + label/ as distributed, or imagesTr/ + labelsTr/ with dataset_0.json)"}

# The original's validation split: the last N cases of each site (sorted by name).
ORIGINAL_VAL = {"liver": 25, "spleen": 9, "pancreas": 56, "kidneys": 42}
ORIGINAL_CASES = {"liver": 131, "spleen": 41, "pancreas": 281, "kidneys": 210}  # labelled cases per archive
REAL_SPACING = (1.5, 1.5, 2.0)  # the original's working spacing in mm
REAL_CACHE_VERSION = "real-v1"
MAX_SEARCH_DEPTH = 4


@dataclass
class Pair:
    """One image and its label file (label None for an unlabelled scan)."""

    name: str
    image: str
    label: str | None


@dataclass
class Source:
    """One dataset as found on disk, and how its label values become organs."""

    role: str  # a site ("liver", ...) or "test"
    layout: str  # msd, nnunet, kits19, btcv, btcv-monai, folders
    root: str
    pairs: list[Pair]
    declared: tuple[int, ...] | None  # label values the layout declares; None: not declared
    problems: list[str] = field(default_factory=list)  # missing files, found while listing
    notes: list[str] = field(default_factory=list)  # harmless facts (e.g. unlabelled cases skipped)

    @property
    def label_map(self) -> dict[int, int] | None:
        """Raw label value -> ORGAN_ID; None: every non-zero value is the site's organ.

        The test set and BTCV-style folders carry BTCV's ids; a site's own dataset (MSD,
        KiTS19) labels one organ, and its tumour label merges into that organ.
        """
        if self.role == "test":
            return {v: ORGAN_ID[o] for o in ORGANS for v in BTCV_IDS[o]}
        organ = SITE_ORGAN[self.role]
        if self.layout in ("btcv", "btcv-monai"):
            return dict.fromkeys(BTCV_IDS[organ], ORGAN_ID[organ])
        if self.declared is not None:
            return {v: ORGAN_ID[organ] for v in self.declared if v != 0}
        return None


def _is_nifti(name: str) -> bool:
    # macOS archives carry "._x.nii.gz" companions that are not NIfTI
    return name.endswith((".nii.gz", ".nii")) and not name.startswith("._")


def _stem(name: str) -> str:
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def _niftis(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if _is_nifti(n)) if os.path.isdir(folder) else []


def find_dataset(path: str, role: str) -> Source:
    """Recognise the dataset layout at `path` and list its image/label pairs."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such folder")
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a folder")
    if os.path.isfile(os.path.join(path, "dataset.json")):
        return _from_dataset_json(path, role)
    if os.path.isfile(os.path.join(path, "dataset_0.json")):
        return _from_monai_json(path, role)
    kits = os.path.join(path, "data") if os.path.isdir(os.path.join(path, "data")) else path
    if any(n.startswith("case_") and os.path.isdir(os.path.join(kits, n)) for n in os.listdir(kits)):
        return _from_kits19(kits, role)
    if os.path.isdir(os.path.join(path, "imagesTr")) and os.path.isdir(os.path.join(path, "labelsTr")):
        return _from_folders(path, role, "folders", None)
    btcv = _btcv_folders(path)
    if btcv:
        return _from_btcv(path, btcv, role)
    if not os.listdir(path):
        raise DataError(f"{path}: the folder is empty")
    raise DataError(f"{path}: no dataset found (looked for dataset.json, dataset_0.json, case_*/ folders, "
                    f"imagesTr/ + labelsTr/, img/ + label/)")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def _declared(labels, path: str) -> tuple[int, ...] | None:
    """Label values from a dataset.json `labels` entry: MSD {"0": "background", ...} or
    nnU-Net v2 {"background": 0, ...}."""
    if labels is None:
        return None
    try:
        if isinstance(labels, dict) and all(isinstance(v, int) for v in labels.values()):
            return tuple(sorted(labels.values()))
        if isinstance(labels, dict):
            return tuple(sorted(int(k) for k in labels))
    except ValueError:
        pass
    raise DataError(f"{path}: 'labels' is neither {{\"0\": \"background\", ...}} nor {{\"background\": 0, ...}}")


def _resolve(root: str, rel: str, nnunet_channel: bool = False) -> str:
    path = os.path.normpath(os.path.join(root, rel))
    if nnunet_channel and not os.path.exists(path) and _is_nifti(os.path.basename(path)):
        alt = os.path.join(os.path.dirname(path), _stem(os.path.basename(path)) + "_0000.nii.gz")
        if os.path.exists(alt):
            return alt  # nnU-Net v1 lists x.nii.gz for the file x_0000.nii.gz
    return path


def _pairs_from_list(root: str, entries, meta_path: str, key: str) -> tuple[list[Pair], list[str]]:
    pairs, problems = [], []
    if not isinstance(entries, list):
        raise DataError(f"{meta_path}: '{key}' is not a list")
    for entry in entries:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DataError(f"{meta_path}: '{key}' entries need 'image' and 'label'")
        image, label = _resolve(root, entry["image"], True), _resolve(root, entry["label"])
        for f in (image, label):
            if not os.path.isfile(f):
                problems.append(f"{meta_path} names {f}, which does not exist")
        pairs.append(Pair(_stem(os.path.basename(label)), image, label))
    return pairs, problems


def _from_dataset_json(path: str, role: str) -> Source:
    meta_path = os.path.join(path, "dataset.json")
    meta = _read_json(meta_path)
    declared = _declared(meta.get("labels"), meta_path)
    if "training" not in meta:  # nnU-Net v2: no file list, the folders speak
        return _from_folders(path, role, "nnunet", declared)
    pairs, problems = _pairs_from_list(path, meta["training"], meta_path, "training")
    layout = "nnunet" if any(_stem(os.path.basename(p.image)).endswith("_0000") for p in pairs) else "msd"
    return Source(role, layout, path, sorted(pairs, key=lambda p: p.name), declared, problems)


def _from_monai_json(path: str, role: str) -> Source:
    meta_path = os.path.join(path, "dataset_0.json")
    meta = _read_json(meta_path)
    declared = _declared(meta.get("labels"), meta_path) or tuple(range(14))
    pairs, problems = [], []
    for key in ("training", "validation"):  # MONAI splits BTCV's 30 labelled scans in two
        if key in meta:
            more, bad = _pairs_from_list(path, meta[key], meta_path, key)
            pairs += more
            problems += bad
    return Source(role, "btcv-monai", path, sorted(pairs, key=lambda p: p.name), declared, problems)


def _from_kits19(path: str, role: str) -> Source:
    pairs, notes = [], []
    unlabelled = 0
    for name in sorted(n for n in os.listdir(path) if n.startswith("case_")):
        image = os.path.join(path, name, "imaging.nii.gz")
        label = os.path.join(path, name, "segmentation.nii.gz")
        if not os.path.isfile(image):
            continue
        if not os.path.isfile(label):
            unlabelled += 1  # KiTS19's test cases come without segmentation
            continue
        pairs.append(Pair(name, image, label))
    if unlabelled:
        notes.append(f"{unlabelled} case(s) without segmentation.nii.gz skipped")
    return Source(role, "kits19", path, pairs, (0, 1, 2), [], notes)


def _from_folders(path: str, role: str, layout: str, declared) -> Source:
    images, labels = os.path.join(path, "imagesTr"), os.path.join(path, "labelsTr")
    pairs, problems = [], []
    for name in _niftis(images):
        stem = _stem(name)
        base = stem[: -len("_0000")] if stem.endswith("_0000") else stem
        label = os.path.join(labels, base + ".nii.gz")
        if not os.path.isfile(label):
            problems.append(f"{os.path.join(images, name)}: no label {label}")
        pairs.append(Pair(base, os.path.join(images, name), label))
    if layout == "folders" and any(_stem(p.image).endswith("_0000") for p in pairs):
        layout = "nnunet"
    return Source(role, layout, path, pairs, declared, problems)


def _btcv_folders(path: str) -> list[tuple[str, str]]:
    """(img/, label/) folder pairs anywhere below `path` (BTCV: RawData/Training/{img,label})."""
    found = []
    for folder, dirs, _ in _walk(path):
        if "img" in dirs and "label" in dirs and any(n.startswith("img") for n in _niftis(os.path.join(folder, "img"))):
            found.append((os.path.join(folder, "img"), os.path.join(folder, "label")))
    return found


def _from_btcv(path: str, folders: list[tuple[str, str]], role: str) -> Source:
    pairs, problems = [], []
    for img_dir, lab_dir in folders:
        for name in _niftis(img_dir):
            if not name.startswith("img"):
                continue
            label = os.path.join(lab_dir, "label" + name[len("img"):])
            if not os.path.isfile(label):
                problems.append(f"{os.path.join(img_dir, name)}: no label {label}")
            pairs.append(Pair(_stem(name), os.path.join(img_dir, name), label))
    return Source(role, "btcv", path, sorted(pairs, key=lambda p: p.name), tuple(range(14)), problems)


def _walk(root: str, depth: int = MAX_SEARCH_DEPTH):
    """os.walk, at most `depth` folders deep, in sorted order, skipping hidden folders."""
    base = root.rstrip(os.sep).count(os.sep)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folder.count(os.sep) - base >= depth:
            dirs[:] = []
        yield folder, dirs, files


def locate(data_root: str, role: str) -> str | None:
    """The folder under `data_root` that holds `role`'s dataset, or None."""
    for folder, dirs, files in _walk(data_root):
        if os.path.basename(folder) in ROOT_NAMES[role] and folder != data_root:
            return folder
        if role == "test" and ("dataset_0.json" in files or ("img" in dirs and "label" in dirs)):
            return folder
    return None


def find_sources(roles, data_root: str | None = None, overrides: dict[str, str] | None = None) -> dict[str, Source]:
    """The dataset of each role: its --ROLE override, else found under --data-root."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    if data_root is not None and not os.path.isdir(data_root):
        raise DataError(f"--data-root {data_root}: no such folder")
    paths = {}
    for role in roles:
        if role in overrides:
            paths[role] = overrides[role]
        elif data_root is not None:
            paths[role] = locate(data_root, role)
    missing = [r for r in roles if paths.get(r) is None]
    if missing and data_root is not None and all(paths.get(r) is None for r in roles):
        raise DataError(f"--data-root {data_root}: none of the expected datasets found (looked for "
                        + "; ".join(f"{r}: {LOOKED_FOR[r]}" for r in roles) + ")")
    if missing:
        where = f"under --data-root {data_root}" if data_root else "(no --data-root)"
        raise DataError("no dataset for " + ", ".join(f"{r} (looked for {LOOKED_FOR[r]}; or pass --{r} PATH)"
                                                       for r in missing) + f" {where}")
    return {role: find_dataset(paths[role], role) for role in roles}


# ---------------------------------------------------------------------------------------
# Reading and checking NIfTI volumes
# ---------------------------------------------------------------------------------------


def read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D volume as stored (array order) and its affine; DataError if unusable."""
    import nibabel as nib

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip, not NIfTI, bad header, ...
        reason = (str(e).splitlines() or [""])[0][:160]
        raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {reason})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a {data.ndim}-D volume of shape {tuple(data.shape)}; a 3-D CT is expected")
    return data, np.asarray(img.affine, dtype=np.float64)


def label_counts(label: np.ndarray, slab: int = 32) -> dict[int, int]:
    """Voxel count of each label value, in slabs so memory stays at one slab of int64."""
    if not np.issubdtype(label.dtype, np.integer):
        for z in range(0, label.shape[2], slab):
            part = label[:, :, z:z + slab]
            if not np.array_equal(part, np.round(part)):
                raise ValueError("non-integer label values")
    counts: dict[int, int] = {}
    for z in range(0, label.shape[2], slab):
        values, n = np.unique(np.asarray(label[:, :, z:z + slab]).astype(np.int64), return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
    return counts


def read_pair(pair: Pair, declared: tuple[int, ...] | None):
    """Image (HU), label, affine and label value counts of a pair, checked; the first
    problem raises DataError."""
    image, affine = read_nifti(pair.image)
    if np.issubdtype(image.dtype, np.floating):
        bad = int((~np.isfinite(image)).sum())
        if bad:
            raise DataError(f"{pair.image}: {bad} NaN or inf voxel(s)")
    if pair.label is None:
        return image, None, affine, {}
    label, label_affine = read_nifti(pair.label)
    if label.shape != image.shape:
        raise DataError(f"{pair.label}: shape {tuple(label.shape)} differs from its image's "
                        f"{tuple(image.shape)} ({pair.image})")
    if not np.allclose(label_affine, affine, rtol=0, atol=1e-2):
        raise DataError(f"{pair.label}: affine differs from its image's ({pair.image})")
    try:
        counts = label_counts(label)
    except ValueError:
        raise DataError(f"{pair.label}: label values are not integers") from None
    if declared is not None:
        undeclared = sorted(set(counts) - set(declared))
        if undeclared:
            raise DataError(f"{pair.label}: label value(s) {undeclared} not declared by the dataset "
                            f"(declared: {list(declared)})")
    return image, label, affine, counts


def organ_labels(raw: np.ndarray, label_map: dict[int, int] | None, organ_id: int) -> np.ndarray:
    """Raw label values to ORGAN_ID values (uint8); unmapped values are background."""
    if label_map is None:
        return ((raw != 0) * organ_id).astype(np.uint8)
    out = np.zeros(raw.shape, np.uint8)
    for value, oid in label_map.items():
        out[raw == value] = oid
    return out


# ---------------------------------------------------------------------------------------
# Preprocessing: RAS, working spacing, body crop; and back to the original grid
# ---------------------------------------------------------------------------------------


def _to_ras(affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    return nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt("RAS"))


def axis_codes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(affine))


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source voxel of each target voxel when n_in voxels and n_out voxels span one extent
    (PyTorch's "nearest-exact"; the same rule maps a prediction back)."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def preprocess_arrays(image: np.ndarray, affine: np.ndarray, raw_label: np.ndarray | None,
                      label_map: dict[int, int] | None, organ_id: int, spacing,
                      name: str = "", source_file: str = "") -> Case:
    """One volume as stored -> a Case on the working grid, with the geometry to undo it."""
    import nibabel as nib

    ornt = _to_ras(affine)
    shape = tuple(int(n) for n in image.shape)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape)
    voxel = np.linalg.norm(ras_affine[:3, :3], axis=0)
    ras = nib.orientations.apply_orientation(image, ornt)
    ras_shape = tuple(int(n) for n in ras.shape)
    size = [max(1, round(n * s / t)) for n, s, t in zip(ras_shape, voxel, spacing)]
    hu = torch.from_numpy(np.ascontiguousarray(ras, dtype=np.float32))
    del ras
    hu = F.interpolate(hu[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    if raw_label is None:
        label = torch.zeros(size, dtype=torch.uint8)
    else:
        lab = nib.orientations.apply_orientation(raw_label, ornt)
        lab = lab[np.ix_(*[nearest_index(n, m) for n, m in zip(ras_shape, size)])]
        label = torch.from_numpy(organ_labels(lab, label_map, organ_id))
    box = body_box(hu)
    geometry = {"affine": affine.tolist(), "shape": list(shape), "ras_shape": list(ras_shape),
                "resampled": list(size), "box": [[s.start, s.stop] for s in box], "source": source_file}
    actual = tuple(float(n * s / m) for n, s, m in zip(ras_shape, voxel, size))
    return Case(name, hu[box].contiguous(), label[box].contiguous(), actual, geometry)


def to_original_grid(label: torch.Tensor | np.ndarray, geometry: dict) -> np.ndarray:
    """A label map on a case's working grid -> the original image's grid and array order."""
    import nibabel as nib

    label = label.cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    full = np.zeros(geometry["resampled"], dtype=label.dtype)
    box = tuple(slice(lo, hi) for lo, hi in geometry["box"])
    full[box] = label
    ras = full[np.ix_(*[nearest_index(m, n) for m, n in zip(geometry["resampled"], geometry["ras_shape"])])]
    affine = np.asarray(geometry["affine"])
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras, back))


def to_btcv_ids(label: torch.Tensor) -> np.ndarray:
    """ORGAN_ID label map (RAS, working grid) -> BTCV ids; each kidney component becomes the
    right (2) or left (3) kidney by the side of the body's midline its centre lies on."""
    from scipy import ndimage

    lab = label.cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    out = np.zeros(lab.shape, np.uint8)
    for organ in ("liver", "spleen", "pancreas"):
        out[lab == ORGAN_ID[organ]] = BTCV_IDS[organ][0]
    kidney = lab == ORGAN_ID["kidneys"]
    parts, n = ndimage.label(kidney, structure=np.ones((3, 3, 3), bool))
    if n:
        centres = ndimage.center_of_mass(kidney, parts, range(1, n + 1))
        midline = (lab.shape[0] - 1) / 2  # the case is cropped to the body; +x is the patient's right
        side = np.array([0] + [BTCV_RIGHT_KIDNEY if c[0] > midline else BTCV_LEFT_KIDNEY for c in centres],
                        np.uint8)
        out[kidney] = side[parts[kidney]]
    return out


def save_label_nifti(label: np.ndarray, geometry: dict, path: str) -> None:
    """Write a label map on the original grid with the original affine, atomically."""
    import nibabel as nib

    affine = np.asarray(geometry["affine"])
    header = None
    src = geometry.get("source")
    if src and os.path.isfile(src):
        header = nib.load(src).header.copy()  # keeps qform/sform codes, so viewers align it
    img = nib.Nifti1Image(label.astype(np.uint8), affine, header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz" if path.endswith(".gz") else ".nii")


# ---------------------------------------------------------------------------------------
# Loading a dataset: preprocessing in worker processes, cached on disk
# ---------------------------------------------------------------------------------------


def _stat(path: str | None) -> list:
    if path is None:
        return [None]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def case_cache_path(pair: Pair, source: Source, spacing, cache_dir: str) -> str:
    """Cache file of one case: keyed by the source files (path, size, mtime) and every
    preprocessing parameter, so a changed file or parameter is never served stale."""
    label_map = source.label_map
    key = json.dumps([REAL_CACHE_VERSION, _stat(pair.image), _stat(pair.label), [float(s) for s in spacing],
                      sorted(label_map.items()) if label_map is not None else None,
                      ORGAN_ID.get(SITE_ORGAN.get(source.role, ""), 0), source.declared])
    return os.path.join(cache_dir, f"{REAL_CACHE_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt")


def preprocess_pair(pair: Pair, source: Source, spacing) -> Case:
    image, raw, affine, _ = read_pair(pair, source.declared)
    organ_id = ORGAN_ID[SITE_ORGAN[source.role]] if source.role != "test" else 0
    return preprocess_arrays(image, affine, raw, source.label_map, organ_id, spacing, pair.name, pair.image)


def _save_case(case: Case, path: str) -> None:
    hu = case.hu.round().clamp(-32768, 32767).to(torch.int16)  # whole HU are plenty; half the disk
    blob = {"name": case.name, "hu": hu, "label": case.label, "spacing": list(case.spacing),
            "geometry": case.geometry}
    write_atomic(path, lambda tmp: torch.save(blob, tmp))


def _load_case(path: str) -> Case:
    blob = torch.load(path, weights_only=True)
    return Case(blob["name"], blob["hu"].float(), blob["label"], tuple(blob["spacing"]), blob["geometry"])


def _preprocess_to_cache(pair: Pair, source: Source, spacing, path: str) -> str:
    torch.set_num_threads(1)
    _save_case(preprocess_pair(pair, source, spacing), path)
    return path


def load_source(source: Source, spacing, cache_dir: str | None, workers: int = 1,
                max_cases: int | None = None) -> list[Case]:
    """Every case of a dataset, preprocessed (cached under `cache_dir` when given)."""
    if source.problems:
        raise DataError(source.problems[0])
    pairs = source.pairs[:max_cases] if max_cases else source.pairs
    if not pairs:
        raise DataError(f"{source.root}: no labelled case found ({source.layout} layout)")
    desc = f"preprocess {source.role}"
    if cache_dir is None:
        return [preprocess_pair(p, source, spacing) for p in tqdm(pairs, desc=desc, disable=None, leave=False)]
    os.makedirs(cache_dir, exist_ok=True)
    paths = [case_cache_path(p, source, spacing, cache_dir) for p in pairs]
    todo = [(p, path) for p, path in zip(pairs, paths) if not os.path.exists(path)]
    if todo and workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: forking a process that already ran torch's thread pools can hang
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
            futures = [pool.submit(_preprocess_to_cache, p, source, spacing, path) for p, path in todo]
            try:
                for f in tqdm(as_completed(futures), total=len(futures), desc=desc, disable=None, leave=False):
                    f.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    else:
        for p, path in tqdm(todo, desc=desc, disable=None, leave=False):
            _save_case(preprocess_pair(p, source, spacing), path)
    return [_load_case(path) for path in paths]


def check_labelled(cases: list[Case], source: Source) -> None:
    """A site must label its organ somewhere, and the test set some organ."""
    if not any(bool((c.label > 0).any()) for c in cases):
        what = "any organ" if source.role == "test" else f"the {SITE_ORGAN[source.role]}"
        raise DataError(f"{source.root}: no voxel of {what} is labelled in any of its {len(cases)} case(s)")


def split_validation(pairs: list[Pair], site: str, val: str = "auto", seed: int = 0
                     ) -> tuple[list[Pair], list[Pair], str]:
    """Training and validation pairs, and the rule that split them, in words.

    "auto": the original's split when the folder holds the original archive's cases (the last
    N held out: liver 25 of 131, spleen 9 of 41, pancreas 56 of 281, kidneys 42 of 210), else
    a fifth of them (at least one), chosen with the seed; a site of one case trains on it.
    "original": the original's split, whatever the folder holds. A fraction F: round(F * n)
    cases chosen with the seed."""
    n = len(pairs)
    if val == "auto":
        if n == ORIGINAL_CASES[site]:
            val = "original"
        elif n < 2:
            return pairs, [], f"{n} case: too few to hold one out, trains on all, no validation"
        else:
            n_val = max(1, round(0.2 * n))
            train, held = _seeded_split(pairs, n_val, seed)
            return train, held, f"a fifth held out for validation ({n_val} of {n}, seeded)"
    if val == "original":
        n_val = ORIGINAL_VAL[site]
        if n_val >= n:
            raise DataError(f"{site}: {n} case(s), but the original split holds out the last {n_val} for "
                            f"validation; pass --val-split FRACTION (e.g. 0.2, or 0 for none)")
        return pairs[: n - n_val], pairs[n - n_val:], f"the original's split (the last {n_val} of {n})"
    n_val = round(float(val) * n)
    if n_val >= n:
        raise DataError(f"{site}: --val-split {val} would leave none of its {n} case(s) for training")
    train, held = _seeded_split(pairs, n_val, seed)
    return train, held, f"--val-split {val}: {n_val} of {n} held out (seeded)"


def _seeded_split(pairs: list[Pair], n_val: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    held = set(np.random.default_rng(seed).permutation(len(pairs))[:n_val].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def real_validation(sites, data_root: str | None, overrides: dict[str, str] | None, spacing,
                    cache_dir: str | None, workers: int = 1, val_split: str = "auto", seed: int = 0,
                    max_cases: int | None = None) -> dict[str, list[Case]]:
    """The validation cases each site holds out (the same split as real_federation)."""
    out = {}
    for role, source in find_sources(sites, data_root, overrides).items():
        _, held, _ = split_validation(source.pairs, role, val_split, seed)
        if not held:
            out[role] = []
            continue
        out[role] = load_source(Source(role, source.layout, source.root, held, source.declared, source.problems),
                                spacing, cache_dir, workers, max_cases)
    return out


def real_federation(sites, data_root: str | None, overrides: dict[str, str] | None, spacing,
                    cache_dir: str | None, workers: int = 1, val_split: str = "auto", seed: int = 0,
                    max_cases: int | None = None) -> tuple[dict[str, list[Case]], list[Case], dict]:
    """Training cases of each site, the test set, and a record of where they came from."""
    sources = find_sources((*sites, "test"), data_root, overrides)
    train, info = {}, {"roots": {}, "layouts": {}, "validation": {}}
    for role, source in sources.items():
        info["roots"][role] = os.path.abspath(source.root)
        info["layouts"][role] = source.layout
        if role != "test":
            keep, held, rule = split_validation(source.pairs, role, val_split, seed)
            print(f"{role}: {len(keep)} training case(s); {rule}")
            info["validation"][role] = [p.name for p in held]
            source = Source(source.role, source.layout, source.root, keep, source.declared, source.problems)
        cases = load_source(source, spacing, cache_dir, workers, max_cases)
        check_labelled(cases, source)
        if role == "test":
            test = cases
        else:
            train[role] = cases
    return train, test, info


# ---------------------------------------------------------------------------------------
# python datasets.py inspect: check a download before a long run
# ---------------------------------------------------------------------------------------


def add_source_arguments(p, roles=(*ORGANS, "test")) -> None:
    """The command-line flags that point at real data (shared by train.py, eval.py, datasets.py)."""
    p.add_argument("--data-root", metavar="DIR",
                   help="folder holding the public datasets as unpacked (Task03_Liver, Task09_Spleen, "
                        "Task07_Pancreas, kits19 or Task040_KiTS, BTCV); without it the phantom is used")
    p.add_argument("--data", action="append", default=[], metavar="SITE=PATH", type=site_path(roles),
                   help=f"a dataset that is not under --data-root, one flag per dataset; SITE is one of "
                        f"{', '.join(roles)}")


def site_path(roles):
    """argparse type of --data: SITE=PATH with a known SITE."""
    def parse(text: str) -> tuple[str, str]:
        site, sep, path = text.partition("=")
        if not sep or site not in roles or not path:
            raise argparse.ArgumentTypeError(f"{text!r}: expected SITE=PATH with SITE one of {', '.join(roles)}")
        return site, path
    return parse


def source_overrides(args) -> dict[str, str]:
    """--data SITE=PATH flags as {site: path} (the last one wins for a site named twice)."""
    return dict(getattr(args, "data", None) or [])


def inspect_source(source: Source, read_data: bool = True) -> dict:
    """Cases, shapes, spacings, axis codes and label values of a dataset, and its problems."""
    import nibabel as nib

    report = {"role": source.role, "layout": source.layout, "root": os.path.abspath(source.root),
              "cases": len(source.pairs), "declared_labels": list(source.declared) if source.declared else None,
              "label_map": {str(k): v for k, v in source.label_map.items()} if source.label_map else "non-zero",
              "shapes": {}, "spacings": {}, "axis_codes": {}, "label_voxels": {}, "problems": list(source.problems),
              "notes": list(source.notes)}
    organ_found = False
    for pair in tqdm(source.pairs, desc=f"inspect {source.role}", disable=None, leave=False):
        try:
            if not os.path.isfile(pair.image):
                continue  # already a problem of the listing
            img = nib.load(pair.image)
            shape = "x".join(map(str, img.shape))
            spacing = "x".join(f"{z:.2f}" for z in img.header.get_zooms()[:3])
            codes = axis_codes(img.affine)
            for key, value in (("shapes", shape), ("spacings", spacing), ("axis_codes", codes)):
                report[key][value] = report[key].get(value, 0) + 1
            if read_data and pair.label is not None and os.path.isfile(pair.label):
                *_, counts = read_pair(pair, source.declared)
                for v, n in counts.items():
                    report["label_voxels"][str(v)] = report["label_voxels"].get(str(v), 0) + n
                mapped = source.label_map
                organ_found |= any(n > 0 and v != 0 and (mapped is None or v in mapped) for v, n in counts.items())
        except DataError as e:
            report["problems"].append(str(e))
        except Exception as e:  # a header nibabel cannot parse
            report["problems"].append(f"{pair.image}: cannot be read ({type(e).__name__}: {e})")
    if not source.pairs:
        report["problems"].append(f"{source.root}: no labelled case found")
    elif read_data and not organ_found:
        what = "any organ" if source.role == "test" else f"the {SITE_ORGAN[source.role]}"
        report["problems"].append(f"{source.root}: no voxel of {what} is labelled in any case")
    return report


def format_report(r: dict) -> str:
    def counted(d: dict) -> str:
        return ", ".join(f"{k} ({v})" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"

    lines = [f"{r['role']}: {r['cases']} case(s), {r['layout']} layout, {r['root']}",
             f"  shapes      {counted(r['shapes'])}",
             f"  spacing mm  {counted(r['spacings'])}",
             f"  axis codes  {counted(r['axis_codes'])}",
             "  labels      " + (", ".join(f"{k}: {v} voxels" for k, v in sorted(r["label_voxels"].items(),
                                                                            key=lambda kv: int(kv[0])))
                                 or "not read"),
             f"  organ map   {r['label_map']}"]
    lines += [f"  note        {n}" for n in r["notes"]]
    lines += [f"  PROBLEM     {p}" for p in r["problems"]] or ["  problems    none"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="datasets.py", description="Check real datasets before training on them.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("inspect", help="print cases, shapes, spacings, axis codes, label values and problems")
    add_source_arguments(q)
    q.add_argument("--nodes", type=int, default=4, choices=(1, 2, 3, 4), help="which sites to look for (default 4)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--headers-only", action="store_true", help="read headers only (fast; no label values)")
    args = p.parse_args(argv)
    roles = (*NODE_SITES[args.nodes], "test")
    overrides = source_overrides(args)
    if not args.data_root and not overrides:
        p.error("inspect needs --data-root DIR or a --ROLE PATH")
    reports = []
    try:
        if args.data_root and not os.path.isdir(args.data_root):
            raise DataError(f"--data-root {args.data_root}: no such folder")
        paths = {r: overrides.get(r) or (locate(args.data_root, r) if args.data_root else None) for r in roles}
        if all(v is None for v in paths.values()):
            find_sources(roles, args.data_root, overrides)  # raises the message naming what was looked for
        for role in roles:
            if paths[role] is None:
                reports.append({"role": role, "missing": True,
                                "problems": [f"no {role} dataset found (looked for {LOOKED_FOR[role]})"]})
                continue
            try:
                reports.append(inspect_source(find_dataset(paths[role], role), not args.headers_only))
            except DataError as e:
                reports.append({"role": role, "root": paths[role], "problems": [str(e)]})
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for r in reports:
            print(format_report(r) if "cases" in r else f"{r['role']}:\n" + "\n".join(
                f"  PROBLEM     {x}" for x in r["problems"]))
    return 1 if any(r["problems"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
