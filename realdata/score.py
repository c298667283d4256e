"""`python -m realdata score -p PRED -l LABELS`: a folder of predictions scored against a folder of
label maps, as nnU-Net's evaluate-folder: for each label map in LABELS, the prediction of the same
case name in PRED; Dice, HD95 and NSD of each organ per case (metrics.py, in the label's voxel
spacing), each organ's mean, written to PRED/summary.json and printed as tables.

Both folders hold NIfTI label maps in BTCV's ids (1 spleen, 2 right kidney, 3 left kidney,
6 liver, 11 pancreas; the kidneys scored together), or in the ids `--ids` gives. A pair that cannot
be scored (no prediction, a different grid, unreadable) is named on one line and left out; the
others are still scored, and the command then exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from common import check_writable, fail, write_json_atomic
from data import ORGANS, DataError
from metrics import (
    METRICS,
    NSD_TOLERANCE_MM,
    dice,
    hd95_from_distances,
    surface_dice_from_distances,
    surface_distances,
)
from realdata.archives import BTCV_IDS
from realdata.nifti import integer_labels, read_nifti, same_grid
from realdata.predict import list_scans
from report import format_metric_tables, summarise

OrganIds = dict[str, tuple[int, ...]]


def parse_ids(items: Sequence[str]) -> OrganIds:
    """ORGAN=ID[,ID...] items -> {organ: ids}; ValueError naming the item that is not one."""
    ids: OrganIds = {}
    for item in items:
        organ, _, values = item.partition("=")
        try:
            parsed = tuple(int(v) for v in values.split(","))
        except ValueError:
            parsed = ()
        if organ not in ORGANS or not parsed or min(parsed) < 1:
            raise ValueError(
                f"{item!r}: expected ORGAN=ID[,ID...] with ORGAN one of {', '.join(ORGANS)} and "
                "ids above 0"
            )
        ids[organ] = parsed
    return ids


def read_label_map(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A label map and its affine, checked as read_nifti checks, with integer values; DataError
    naming the file and the problem otherwise."""
    label, affine = read_nifti(path)
    try:
        return integer_labels(label), affine
    except ValueError:
        raise DataError(f"{path}: label values are not integers") from None


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """The size in mm of a voxel along each array axis (not along R, A, S)."""
    return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))


def organ_scores(
    pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], spacing: Sequence[float]
) -> dict[str, dict[str, float]]:
    """{metric: {organ: value}} of each organ's predicted mask against its true one (boolean
    arrays of one grid), `spacing` the voxel size along each array axis; both surface metrics from
    one surface distance computation."""
    scores: dict[str, dict[str, float]] = {metric: {} for metric in METRICS}
    for organ, t in truth.items():
        p = pred[organ]
        scores["dice"][organ] = dice(torch.from_numpy(p), torch.from_numpy(t))
        distances = surface_distances(p, t, spacing)
        scores["hd95"][organ] = hd95_from_distances(*distances)
        scores["nsd"][organ] = surface_dice_from_distances(*distances, NSD_TOLERANCE_MM)
    return scores


def organ_masks_of(label: np.ndarray, ids: OrganIds) -> dict[str, np.ndarray]:
    """Each organ's mask in a label map: the voxels holding one of its ids."""
    return {organ: np.isin(label, values) for organ, values in ids.items()}


def score_pair(pred_path: str, label_path: str, ids: OrganIds) -> dict[str, dict[str, float]]:
    """{metric: {organ: value}} of one prediction against its label map, in the label's voxel
    spacing; DataError when the two cannot be compared."""
    truth, affine = read_label_map(label_path)
    pred, pred_affine = read_label_map(pred_path)
    if pred.shape != truth.shape:
        raise DataError(f"{pred_path}: shape {tuple(pred.shape)} differs from its label map's "
                        f"{tuple(truth.shape)} ({label_path})")
    if not same_grid(pred_affine, affine, truth.shape):
        raise DataError(f"{pred_path}: affine differs from its label map's ({label_path})")
    return organ_scores(
        organ_masks_of(pred, ids), organ_masks_of(truth, ids), voxel_spacing(affine)
    )


def prediction_of(folder: str, case: str) -> str | None:
    """PRED/<case>.nii.gz, else PRED/<case>.nii; None if neither is there."""
    for ext in (".nii.gz", ".nii"):
        path = os.path.join(folder, case + ext)
        if os.path.isfile(path):
            return path
    return None


def score_folder(pred: str, labels: str, ids: OrganIds) -> dict:
    """Every label map in the folder `labels` scored against its case's prediction in `pred`: the
    summary.json content ({metric: {organ: summary}}, each summary's "cases" in the order of
    "case_names"). Each pair that cannot be scored is printed on one line and listed under
    "failed"."""
    per_case = {metric: {organ: [] for organ in ids} for metric in METRICS}
    names, failed = [], []
    cases = list_scans(labels, "-l")
    bar = tqdm(cases, desc="score", unit="case", disable=None, dynamic_ncols=True)
    for case, label_path in bar:
        pred_path = prediction_of(pred, case)
        try:
            if pred_path is None:
                raise DataError(f"{label_path}: no {case}.nii.gz (or .nii) in {pred}")
            scores = score_pair(pred_path, label_path, ids)
        except DataError as e:
            failed.append({"case": case, "problem": str(e)})
            bar.write(f"error: case {case}: {e}", file=sys.stderr)
            continue
        names.append(case)
        for metric, by_organ in scores.items():
            for organ, value in by_organ.items():
                per_case[metric][organ].append(value)
    bar.close()
    return {
        **{metric: summarise(per_case[metric]) for metric in METRICS},
        "case_names": names,
        "failed": failed,
        "ids": {organ: list(values) for organ, values in ids.items()},
        "nsd_tolerance_mm": NSD_TOLERANCE_MM,
        "pred": os.path.abspath(pred),
        "labels": os.path.abspath(labels),
    }


def main(argv: list[str] | None = None) -> int:
    """python -m realdata score -p PRED -l LABELS: exit 0, 1 if some pair was bad, 2 on bad
    arguments."""
    default = " ".join(f"{o}={','.join(map(str, BTCV_IDS[o]))}" for o in ORGANS)
    p = argparse.ArgumentParser(
        prog="python -m realdata score",
        description="Score the label maps in PRED against those of the same case name in LABELS "
                    "(NIfTI): Dice, HD95 and NSD per organ and case, and each organ's mean, "
                    "written to PRED/summary.json and printed. A pair that cannot be scored "
                    "(missing, another grid, unreadable) is named and left out; the command then "
                    "exits 1.",
    )
    p.add_argument("-p", "--pred", required=True, metavar="PRED", help="folder of predictions")
    p.add_argument("-l", "--labels", required=True, metavar="LABELS",
                   help="folder of reference label maps, <case>.nii.gz")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="where to write the summary (default PRED/summary.json)")
    p.add_argument("--ids", nargs="+", metavar="ORGAN=ID[,ID]",
                   help=f"the organs to score and their ids in both folders (default BTCV's: "
                        f"{default}); organs not named are not scored")
    args = p.parse_args(argv)
    try:
        ids = parse_ids(args.ids) if args.ids else dict(BTCV_IDS)
    except ValueError as e:
        p.error(f"--ids {e}")
    if not os.path.isdir(args.pred):
        fail(f"-p {args.pred}: no such folder")
    if not os.path.isdir(args.labels):
        fail(f"-l {args.labels}: no such folder")
    out = args.output or os.path.join(args.pred, "summary.json")
    check_writable(out, "-o", file=True)
    summary = score_folder(args.pred, args.labels, ids)
    name = os.path.basename(os.path.normpath(args.pred))
    print(format_metric_tables({name: {m: summary[m] for m in METRICS}}, list(ids)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json_atomic(out, summary)
    failed = summary["failed"]
    print(f"{len(summary['case_names'])} case(s) scored, {len(failed)} pair(s) could not be; "
          f"{out}")
    if failed:
        print(f"error: {len(failed)} case(s) could not be scored: "
              f"{', '.join(f['case'] for f in failed)}", file=sys.stderr)
        return 1
    return 0
