"""Real scans brought to the working grid, as the phantom is: reoriented to RAS from the affine,
resampled to the working spacing (linear for images, nearest for labels), cropped to the body,
and cached on disk; and a map on the working grid brought back onto the scan's own grid (a label
map by nearest neighbour, probabilities by trilinear interpolation).

Every volume is reoriented from its affine, never from the array order: KiTS19 stores (slices,
H, W) under an affine that permutes and flips the axes. What was done is kept with the case
(`Case.geometry`), so that a prediction can be put back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import write_atomic
from data import ORGAN_ID, SITE_ORGAN, Case, DataError, body_box
from realdata.archives import Pair, Source
from realdata.nifti import read_pair

REAL_CACHE_VERSION = "real-v1"


def organ_labels(raw: np.ndarray, label_map: dict[int, int] | None, organ_id: int) -> np.ndarray:
    """Raw label values to ORGAN_ID values (uint8); unmapped values are background."""
    if label_map is None:
        return ((raw != 0) * organ_id).astype(np.uint8)
    out = np.zeros(raw.shape, np.uint8)
    for value, oid in label_map.items():
        out[raw == value] = oid
    return out


# ---------------------------------------------------------------------------------------
# To the working grid and back
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


def preprocess_arrays(
    image: np.ndarray,
    affine: np.ndarray,
    raw_label: np.ndarray | None,
    label_map: dict[int, int] | None,
    organ_id: int,
    spacing: tuple[float, float, float],
    name: str = "",
    source_file: str = "",
) -> Case:
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
    geometry = {
        "affine": affine.tolist(),
        "shape": list(shape),
        "ras_shape": list(ras_shape),
        "resampled": list(size),
        "box": [[s.start, s.stop] for s in box],
        "source": source_file,
    }
    actual = tuple(float(n * s / m) for n, s, m in zip(ras_shape, voxel, size))
    return Case(name, hu[box].contiguous(), label[box].contiguous(), actual, geometry)


def uncropped(volume: torch.Tensor | np.ndarray, geometry: dict, fill: float = 0) -> np.ndarray:
    """A volume on a case's working grid (cropped to its body box) -> the whole resampled grid,
    `fill` outside the box."""
    volume = volume.cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    full = np.full(geometry["resampled"], fill, dtype=volume.dtype)
    full[tuple(slice(lo, hi) for lo, hi in geometry["box"])] = volume
    return full


def ras_to_stored(ras: np.ndarray, geometry: dict) -> np.ndarray:
    """A volume on the scan's grid in RAS order -> the scan's own array order."""
    import nibabel as nib

    affine = np.asarray(geometry["affine"])
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.io_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(ras, back))


def to_original_grid(label: torch.Tensor | np.ndarray, geometry: dict) -> np.ndarray:
    """A label map on a case's working grid -> the original image's grid and array order."""
    full = uncropped(label, geometry)
    ras = full[
        np.ix_(*[nearest_index(m, n) for m, n in zip(geometry["resampled"], geometry["ras_shape"])])
    ]
    return ras_to_stored(ras, geometry)


def linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source voxels and the weight of the second, for each of n_out voxels linearly
    interpolated from n_in voxels that span the same extent: PyTorch's rule with
    align_corners=False (source coordinate (i + 0.5) * n_in / n_out - 0.5, held at 0 below it),
    the rule preprocessing resampled the scan with."""
    source = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = source.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo, hi, (source - lo).float()


def resampled_slabs(
    channels: torch.Tensor, geometry: dict, fill: Sequence[float], slab: int = 8
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Channels (C, ...) on a case's working grid -> the scan's own grid in RAS order (its
    `ras_shape`), trilinear, as (rows, values): `slab` planes of the first axis at a time, so that
    a large scan is never held whole in float. Outside the body box each channel is its `fill`.

    The same extent convention as preprocessing (PyTorch's align_corners=False), computed one axis
    at a time: equal to F.interpolate(mode="trilinear") on the whole volume."""
    full = torch.empty((channels.shape[0], *geometry["resampled"]), dtype=torch.float32)
    for c, value in enumerate(fill):
        full[c] = value
    box = tuple(slice(lo, hi) for lo, hi in geometry["box"])
    full[(slice(None), *box)] = channels.detach().float().cpu()
    taps = [linear_taps(m, n) for m, n in zip(geometry["resampled"], geometry["ras_shape"])]
    (x_lo, x_hi, x_w), (y_lo, y_hi, y_w), (z_lo, z_hi, z_w) = taps
    for start in range(0, len(x_lo), slab):
        rows = slice(start, min(start + slab, len(x_lo)))
        w = x_w[rows][:, None, None]
        out = full[:, x_lo[rows]] * (1 - w) + full[:, x_hi[rows]] * w
        w = y_w[:, None]
        out = out[:, :, y_lo] * (1 - w) + out[:, :, y_hi] * w
        out = out[..., z_lo] * (1 - z_w) + out[..., z_hi] * z_w
        yield rows, out


# ---------------------------------------------------------------------------------------
# A dataset's cases: preprocessed in worker processes, cached on disk
# ---------------------------------------------------------------------------------------


def _stat(path: str | None) -> list:
    if path is None:
        return [None]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def case_cache_path(
    pair: Pair, source: Source, spacing: tuple[float, float, float], cache_dir: str
) -> str:
    """Cache file of one case: keyed by the source files (path, size, mtime) and every
    preprocessing parameter, so a changed file or parameter is never served stale."""
    label_map = source.label_map
    key = json.dumps(
        [
            REAL_CACHE_VERSION,
            _stat(pair.image),
            _stat(pair.label),
            [float(s) for s in spacing],
            sorted(label_map.items()) if label_map is not None else None,
            ORGAN_ID.get(SITE_ORGAN.get(source.role, ""), 0),
            source.declared,
        ]
    )
    return os.path.join(
        cache_dir, f"{REAL_CACHE_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    )


def preprocess_pair(pair: Pair, source: Source, spacing: tuple[float, float, float]) -> Case:
    image, raw, affine, _ = read_pair(pair, source.declared)
    organ_id = ORGAN_ID[SITE_ORGAN[source.role]] if source.role != "test" else 0
    return preprocess_arrays(
        image, affine, raw, source.label_map, organ_id, spacing, pair.name, pair.image
    )


def _save_case(case: Case, path: str) -> None:
    hu = case.hu.round().clamp(-32768, 32767).to(torch.int16)  # whole HU are plenty; half the disk
    blob = {"name": case.name, "hu": hu, "label": case.label, "spacing": list(case.spacing),
            "geometry": case.geometry}
    write_atomic(path, lambda tmp: torch.save(blob, tmp))


def _load_case(path: str) -> Case:
    blob = torch.load(path, weights_only=True)
    return Case(
        blob["name"], blob["hu"].float(), blob["label"], tuple(blob["spacing"]), blob["geometry"]
    )


def _preprocess_to_cache(
    pair: Pair, source: Source, spacing: tuple[float, float, float], path: str
) -> str:
    torch.set_num_threads(1)
    _save_case(preprocess_pair(pair, source, spacing), path)
    return path


def load_source(
    source: Source,
    spacing: tuple[float, float, float],
    cache_dir: str | None,
    workers: int = 1,
    max_cases: int | None = None,
) -> list[Case]:
    """Every case of a dataset, preprocessed (cached under `cache_dir` when given)."""
    if source.problems:
        raise DataError(source.problems[0])
    pairs = source.pairs[:max_cases] if max_cases else source.pairs
    if not pairs:
        raise DataError(f"{source.root}: no labelled case found ({source.layout} layout)")
    desc = f"preprocess {source.role}"
    if cache_dir is None:
        return [
            preprocess_pair(p, source, spacing)
            for p in tqdm(pairs, desc=desc, disable=None, leave=False)
        ]
    os.makedirs(cache_dir, exist_ok=True)
    paths = [case_cache_path(p, source, spacing, cache_dir) for p in pairs]
    todo = [(p, path) for p, path in zip(pairs, paths) if not os.path.exists(path)]
    if todo and workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: forking a process that already ran torch's thread pools can hang
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as pool:
            futures = [
                pool.submit(_preprocess_to_cache, p, source, spacing, path) for p, path in todo
            ]
            try:
                for f in tqdm(
                    as_completed(futures), total=len(futures), desc=desc, disable=None, leave=False
                ):
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
        raise DataError(
            f"{source.root}: no voxel of {what} is labelled in any of its {len(cases)} case(s)"
        )
