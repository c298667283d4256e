"""NIfTI volumes read and written with their checks: a scan or label file is readable, 3-D,
numeric and placed in space, or the error names the file and the problem; label maps are
written on a scan's own grid with its orientation, whole or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from common import write_atomic
from data import DataError
from realdata.archives import Pair

# ---------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------


def read_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3-D volume as stored (array order) and its affine, checked: readable, 3-D, not empty,
    numeric voxels, an affine that places the voxels in space; DataError naming the file and
    the problem otherwise."""
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
        raise DataError(
            f"{path}: a {data.ndim}-D volume of shape {tuple(data.shape)}; a 3-D CT is expected"
        )
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise DataError(f"{path}: voxels of type {data.dtype}; integers or floats are expected")
    if 0 in data.shape:
        raise DataError(f"{path}: an empty volume of shape {tuple(data.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    axes = affine[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    # singular or non-finite: no orientation to bring the volume to RAS nor to write labels back
    if not (
        np.isfinite(affine).all() and (sizes > 0).all() and abs(np.linalg.det(axes / sizes)) > 1e-3
    ):
        raise DataError(f"{path}: no usable affine (voxel axes {np.round(axes, 3).tolist()})")
    return data, affine


def has_orientation(path: str) -> bool:
    """Whether a NIfTI header places its voxels in space (a qform or sform code); a label map
    without either carries no geometry of its own and lies on its image's grid."""
    import nibabel as nib

    header = nib.load(path).header
    return bool(int(header.get("qform_code", 0)) or int(header.get("sform_code", 0)))


def same_grid(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> bool:
    """Whether two affines put every voxel of an array of `shape` within half the smallest
    voxel of the same place (headers written by different tools round differently; that
    close, each voxel is still nearest its own). The affine map is linear, so the corners
    bound every voxel."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    apart = np.linalg.norm((a - b)[:3] @ corners, axis=0).max()
    return bool(apart < 0.5 * np.linalg.norm(a[:3, :3], axis=0).min())


def integer_labels(label: np.ndarray, slab: int = 32, tolerance: float = 0.01) -> np.ndarray:
    """Labels stored as floats, rounded to integers where every value lies within `tolerance`
    (absolute) of one (a map of 0s and 1s saved through a scale factor can read back as 0.996
    or 1.00002), in place, a slab at a time; ValueError if some value does not."""
    if np.issubdtype(label.dtype, np.integer):
        return label
    if not label.flags.writeable:
        label = np.array(label)
    for z in range(0, label.shape[2], slab):
        part = label[:, :, z:z + slab]
        rounded = np.rint(part)
        if not np.all(np.abs(part - rounded) <= tolerance):  # NaN fails too
            raise ValueError("non-integer label values")
        part[...] = rounded
    return label


def label_counts(label: np.ndarray, slab: int = 32) -> dict[int, int]:
    """Voxel count of each label value (integers, `integer_labels`), in slabs so memory stays
    at one slab of int64."""
    counts: dict[int, int] = {}
    for z in range(0, label.shape[2], slab):
        values, n = np.unique(
            np.asarray(label[:, :, z : z + slab]).astype(np.int64), return_counts=True
        )
        for v, c in zip(values.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
    return counts


def read_pair(pair: Pair, declared: tuple[int, ...] | None
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict[int, int]]:
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
    if has_orientation(pair.label) and not same_grid(label_affine, affine, label.shape):
        raise DataError(f"{pair.label}: affine differs from its image's ({pair.image})")
    try:
        label = integer_labels(label)
        counts = label_counts(label)
    except ValueError:
        raise DataError(f"{pair.label}: label values are not integers") from None
    if declared is not None:
        undeclared = sorted(set(counts) - set(declared))
        if undeclared:
            raise DataError(
                f"{pair.label}: label value(s) {undeclared} not declared by the dataset "
                f"(declared: {list(declared)})"
            )
    return image, label, affine, counts


# ---------------------------------------------------------------------------------------
# Writing volumes on a scan's grid
# ---------------------------------------------------------------------------------------


def output_header(geometry: dict) -> object | None:
    """The source scan's NIfTI header for a volume written on its grid: its qform/sform codes,
    so that viewers align the two, without what describes the CT itself (the display range a
    viewer would open a label map with, the description, the intent)."""
    import nibabel as nib

    src = geometry.get("source")
    if not (src and os.path.isfile(src)):
        return None
    header = nib.load(src).header.copy()
    header["cal_min"], header["cal_max"], header["descrip"] = 0, 0, b""
    header.set_intent("none")
    return header


def save_label_nifti(label: np.ndarray, geometry: dict, path: str) -> None:
    """Write a label map on the original grid with the original affine, atomically."""
    import nibabel as nib

    affine = np.asarray(geometry["affine"])
    img = nib.Nifti1Image(label.astype(np.uint8), affine, output_header(geometry))
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(
        path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz" if path.endswith(".gz") else ".nii"
    )
