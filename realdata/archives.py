"""The public datasets as they unpack: which folder is which layout (MSD, nnU-Net, MONAI's
BTCV json, KiTS19, BTCV as distributed), the image/label pairs each holds, and finding every
site's dataset under --data-root or at the paths --data SITE=PATH names.

Reading the volumes is nifti.py's; resampling, cropping and the cache are preprocess.py's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from data import ORGAN_ID, ORGANS, SITE_ORGAN, DataError

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
ROOT_NAMES = {
    "liver": ("Task03_Liver",),
    "spleen": ("Task09_Spleen",),
    "pancreas": ("Task07_Pancreas",),
    "kidneys": ("kits19", "Task040_KiTS"),
    "test": ("BTCV", "btcv", "Abdomen"),
}
LOOKED_FOR = {
    "liver": "Task03_Liver/",
    "spleen": "Task09_Spleen/",
    "pancreas": "Task07_Pancreas/",
    "kidneys": "kits19/ or Task040_KiTS/",
    "test": "BTCV (img/ + label/ as distributed, or imagesTr/ + labelsTr/ with dataset_0.json)",
}

# The original's validation split: the last N cases of each site (sorted by name).
ORIGINAL_VAL = {"liver": 25, "spleen": 9, "pancreas": 56, "kidneys": 42}
# labelled cases per archive
ORIGINAL_CASES = {"liver": 131, "spleen": 41, "pancreas": 281, "kidneys": 210}
REAL_SPACING = (1.5, 1.5, 2.0)  # the original's working spacing in mm
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


def _nifti_file(stem: str) -> str | None:
    """`stem`.nii.gz, else `stem`.nii, if either is a file."""
    return next((stem + ext for ext in (".nii.gz", ".nii") if os.path.isfile(stem + ext)), None)


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
    if any(
        n.startswith("case_") and os.path.isdir(os.path.join(kits, n)) for n in os.listdir(kits)
    ):
        return _from_kits19(kits, role)
    if os.path.isdir(os.path.join(path, "imagesTr")) and os.path.isdir(
        os.path.join(path, "labelsTr")
    ):
        return _from_folders(path, role, "folders", None)
    btcv = _btcv_folders(path)
    if btcv:
        return _from_btcv(path, btcv, role)
    if not os.listdir(path):
        raise DataError(f"{path}: the folder is empty")
    raise DataError(
        f"{path}: no dataset found (looked for dataset.json, dataset_0.json, case_*/ folders, "
        f"imagesTr/ + labelsTr/, img/ + label/)"
    )


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    return meta


def _declared(labels: object, path: str) -> tuple[int, ...] | None:
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
    raise DataError(
        f'{path}: \'labels\' is neither {{"0": "background", ...}} nor {{"background": 0, ...}}'
    )


def _resolve(root: str, rel: str, nnunet_channel: bool = False) -> str:
    """The file a JSON entry names; x.nii for x.nii.gz (and the reverse) when only that exists."""
    path = os.path.normpath(os.path.join(root, rel))
    if os.path.exists(path) or not _is_nifti(os.path.basename(path)):
        return path
    stem = os.path.join(os.path.dirname(path), _stem(os.path.basename(path)))
    # nnU-Net v1 lists x.nii.gz for the file x_0000.nii.gz
    return _nifti_file(stem) or (nnunet_channel and _nifti_file(stem + "_0000")) or path


def _pairs_from_list(
    root: str, entries: object, meta_path: str, key: str
) -> tuple[list[Pair], list[str]]:
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
    if not meta.get("training"):  # nnU-Net v2 (or an empty list): no file list, the folders speak
        return _from_folders(path, role, "nnunet", declared)
    pairs, problems = _pairs_from_list(path, meta["training"], meta_path, "training")
    layout = (
        "nnunet"
        if any(_stem(os.path.basename(p.image)).endswith("_0000") for p in pairs)
        else "msd"
    )
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
        image = _nifti_file(os.path.join(path, name, "imaging"))
        label = _nifti_file(os.path.join(path, name, "segmentation"))
        if image is None:
            continue
        if label is None:
            unlabelled += 1  # KiTS19's test cases come without segmentation
            continue
        pairs.append(Pair(name, image, label))
    if unlabelled:
        notes.append(f"{unlabelled} case(s) without segmentation.nii.gz skipped")
    return Source(role, "kits19", path, pairs, (0, 1, 2), [], notes)


def _from_folders(path: str, role: str, layout: str, declared: tuple[int, ...] | None) -> Source:
    images, labels = os.path.join(path, "imagesTr"), os.path.join(path, "labelsTr")
    pairs, problems = [], []
    for name in _niftis(images):
        stem = _stem(name)
        base = stem[: -len("_0000")] if stem.endswith("_0000") else stem
        label = _nifti_file(os.path.join(labels, base)) or os.path.join(labels, base + ".nii.gz")
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
        if (
            "img" in dirs
            and "label" in dirs
            and any(n.startswith("img") for n in _niftis(os.path.join(folder, "img")))
        ):
            found.append((os.path.join(folder, "img"), os.path.join(folder, "label")))
    return found


def _from_btcv(path: str, folders: list[tuple[str, str]], role: str) -> Source:
    pairs, problems = [], []
    for img_dir, lab_dir in folders:
        for name in _niftis(img_dir):
            if not name.startswith("img"):
                continue
            stem = os.path.join(lab_dir, "label" + _stem(name)[len("img"):])
            label = _nifti_file(stem) or stem + ".nii.gz"
            if not os.path.isfile(label):
                problems.append(f"{os.path.join(img_dir, name)}: no label {label}")
            pairs.append(Pair(_stem(name), os.path.join(img_dir, name), label))
    return Source(
        role, "btcv", path, sorted(pairs, key=lambda p: p.name), tuple(range(14)), problems
    )


def _walk(root: str, depth: int = MAX_SEARCH_DEPTH) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk through links too (a root of symlinked downloads), at most `depth` folders deep
    (which also ends any loop of links), in sorted order, skipping hidden folders and the
    __MACOSX copies that macOS archives carry."""
    base = root.rstrip(os.sep).count(os.sep)
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        if folder.count(os.sep) - base >= depth:
            dirs[:] = []
        yield folder, dirs, files


def locate(data_root: str, role: str) -> str | None:
    """The folder under `data_root` that holds `role`'s dataset, or None. Names match in any
    case (KiTS19/); a folder of the right name that holds no dataset is looked into further
    (Task03_Liver/Task03_Liver/, as unpacking into a folder of the same name gives), and is
    the answer only if nothing below holds one (its error then names it)."""
    names = {n.lower() for n in ROOT_NAMES[role]}
    named = None
    for folder, dirs, files in _walk(data_root):
        if folder != data_root and os.path.basename(folder).lower() in names:
            if _holds_dataset(folder, role):
                return folder
            named = named or folder
        if role == "test" and ("dataset_0.json" in files or ("img" in dirs and "label" in dirs)):
            return folder
    return named


def _holds_dataset(folder: str, role: str) -> bool:
    try:
        return bool(find_dataset(folder, role).pairs)
    except DataError:
        return False


def find_sources(roles: Sequence[str], data_root: str | None = None,
                 overrides: dict[str, str] | None = None) -> dict[str, Source]:
    """The dataset of each role (a site, or the test set): the path --data ROLE=PATH names,
    else the one found under --data-root."""
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
        raise DataError(
            "no dataset for "
            + ", ".join(
                f"{r} (looked for {LOOKED_FOR[r]}; or pass --data {r}=PATH)" for r in missing
            )
            + f" {where}"
        )
    return {role: find_dataset(paths[role], role) for role in roles}
