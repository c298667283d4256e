"""Real datasets: NIfTI reading and checks, preprocessing to the working grid (and back to the
original grid), the on-disk cache of preprocessed cases, the validation split, a federation of
real sites, and `python datasets.py inspect`, which checks a download before a long run. Which
folder holds which layout is archives.py's; writing label maps is predict.py's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from archives import (
    LOOKED_FOR,
    ORIGINAL_CASES,
    ORIGINAL_VAL,
    Pair,
    Source,
    find_dataset,
    find_sources,
    locate,
)
from common import write_atomic
from config import add_source_arguments
from data import NODE_SITES, ORGAN_ID, ORGANS, SITE_ORGAN, Case, DataError, body_box

REAL_CACHE_VERSION = "real-v1"

# ---------------------------------------------------------------------------------------
# Reading and checking NIfTI volumes
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
        raise DataError(f"{path}: a {data.ndim}-D volume of shape {tuple(data.shape)}; a 3-D CT is expected")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise DataError(f"{path}: voxels of type {data.dtype}; integers or floats are expected")
    if 0 in data.shape:
        raise DataError(f"{path}: an empty volume of shape {tuple(data.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    axes = affine[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    # singular or non-finite: no orientation to bring the volume to RAS nor to write labels back
    if not (np.isfinite(affine).all() and (sizes > 0).all() and abs(np.linalg.det(axes / sizes)) > 1e-3):
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
        values, n = np.unique(np.asarray(label[:, :, z:z + slab]).astype(np.int64), return_counts=True)
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
                      label_map: dict[int, int] | None, organ_id: int, spacing: tuple[float, float, float],
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


# ---------------------------------------------------------------------------------------
# Loading a dataset: preprocessing in worker processes, cached on disk
# ---------------------------------------------------------------------------------------


def _stat(path: str | None) -> list:
    if path is None:
        return [None]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def case_cache_path(pair: Pair, source: Source, spacing: tuple[float, float, float], cache_dir: str) -> str:
    """Cache file of one case: keyed by the source files (path, size, mtime) and every
    preprocessing parameter, so a changed file or parameter is never served stale."""
    label_map = source.label_map
    key = json.dumps([REAL_CACHE_VERSION, _stat(pair.image), _stat(pair.label), [float(s) for s in spacing],
                      sorted(label_map.items()) if label_map is not None else None,
                      ORGAN_ID.get(SITE_ORGAN.get(source.role, ""), 0), source.declared])
    return os.path.join(cache_dir, f"{REAL_CACHE_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt")


def preprocess_pair(pair: Pair, source: Source, spacing: tuple[float, float, float]) -> Case:
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


def _preprocess_to_cache(pair: Pair, source: Source, spacing: tuple[float, float, float], path: str) -> str:
    torch.set_num_threads(1)
    _save_case(preprocess_pair(pair, source, spacing), path)
    return path


def load_source(source: Source, spacing: tuple[float, float, float], cache_dir: str | None, workers: int = 1,
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

    "auto" (config.resolve makes it "0" for a run that reads no validation cases): the
    original's split when the folder holds the original archive's cases (the last N held out:
    liver 25 of 131, spleen 9 of 41, pancreas 56 of 281, kidneys 42 of 210), else a fifth of
    them (at least one), chosen with the seed; a site of one case trains on it.
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
    if n_val == 0:
        return pairs, [], "every case trains, none held out"
    if n_val >= n:
        raise DataError(f"{site}: --val-split {val} would leave none of its {n} case(s) for training")
    train, held = _seeded_split(pairs, n_val, seed)
    return train, held, f"--val-split {val}: {n_val} of {n} held out (seeded)"


def _seeded_split(pairs: list[Pair], n_val: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    held = set(np.random.default_rng(seed).permutation(len(pairs))[:n_val].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def real_validation(sites: Sequence[str], data_root: str | None, overrides: dict[str, str] | None,
                    spacing: tuple[float, float, float], cache_dir: str | None, workers: int = 1,
                    val_split: str = "auto", seed: int = 0, max_cases: int | None = None) -> dict[str, list[Case]]:
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


def real_federation(sites: Sequence[str], data_root: str | None, overrides: dict[str, str] | None,
                    spacing: tuple[float, float, float], cache_dir: str | None, workers: int = 1,
                    val_split: str = "auto", seed: int = 0, max_cases: int | None = None
                    ) -> tuple[dict[str, list[Case]], list[Case], dict]:
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

    p = argparse.ArgumentParser(prog="datasets.py", description="Check real datasets before training on them.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("inspect", help="print cases, shapes, spacings, axis codes, label values and problems")
    add_source_arguments(q, (*ORGANS, "test"))
    q.add_argument("--nodes", type=int, default=4, choices=(1, 2, 3, 4), help="which sites to look for (default 4)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--headers-only", action="store_true", help="read headers only (fast; no label values)")
    args = p.parse_args(argv)
    roles = (*NODE_SITES[args.nodes], "test")
    overrides = dict(args.data)
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
