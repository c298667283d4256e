"""Evaluation: a trained model run over whole volumes by sliding windows, its output read as
organ masks, and each organ scored by Dice, HD95 and NSD (metrics.py).

There is one inference path, `segment`: the windows' outputs are blended first and only then
read as masks (for the meta-model: merged into one label map, `segviz.merge`), for the test
set, for validation during training, and for figures.

    python eval.py --checkpoint OUT/model.pt      # test a trained model again (OUT/eval/)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from cases import load_test_set
from checkpoint import config_of, model_of, read_checkpoint
from common import amp_dtype, autocast, check_writable, fail, write_json_atomic
from data import ORGAN_ID, Case, DataError
from metrics import (
    METRICS,
    NSD_TOLERANCE_MM,
    dice,
    hd95_from_distances,
    label_dice,
    surface_dice_from_distances,
    surface_distances,
)
from report import format_metric_tables, scored_metrics
from segviz import MODES, merge
from settings import Config, add_arguments, given_of

# ---------------------------------------------------------------------------------------
# Sliding-window inference
# ---------------------------------------------------------------------------------------


def _starts(size: int, roi: int, overlap: float) -> list[int]:
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    starts = list(range(0, size - roi, step))
    return [*starts, size - roi]


def importance_map(roi: Sequence[int], mode: str, device: torch.device | str) -> torch.Tensor:
    """Blending weights of one window: constant, or a Gaussian (sigma = roi / 8) as MONAI.

    Unlike MONAI, which floors its Gaussian at 1e-3, the floor here is the smallest weight, so a
    window's edge counts far less where windows overlap (bench.py gives MONAI this map too)."""
    if mode == "constant":
        return torch.ones(tuple(roi), device=device)
    axes = []
    for n in roi:
        c = (n - 1) / 2
        sigma = n * 0.125
        axes.append(torch.exp(-0.5 * ((torch.arange(n, device=device) - c) / sigma) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    return w.clamp(min=w[w > 0].min())  # no zero weights at the corners


@torch.inference_mode()  # no autograd bookkeeping at all: the outputs are only ever scored
def sliding_window(
    predict: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    roi: Sequence[int],
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch: int = 4,
    pad_value: float = -1024.0,
) -> torch.Tensor:
    """Run `predict` over overlapping windows of a (1, C, X, Y, Z) volume; blend the outputs.

    Volumes smaller than the window are padded with `pad_value` (air, in HU) and cropped back.
    """
    shape = volume.shape[2:]
    pad = [max(0, r - s) for r, s in zip(roi, shape)]
    if any(pad):
        flat = [p for n in reversed(pad) for p in (n // 2, n - n // 2)]
        volume = torch.nn.functional.pad(volume, flat, value=pad_value)
    full = volume.shape[2:]
    weight = importance_map(roi, blend, volume.device)
    corners = [
        (a, b, c)
        for a in _starts(full[0], roi[0], overlap)
        for b in _starts(full[1], roi[1], overlap)
        for c in _starts(full[2], roi[2], overlap)
    ]
    out = None
    norm = torch.zeros(full, device=volume.device)
    for i in range(0, len(corners), batch):
        chunk = corners[i:i + batch]
        x = torch.cat([volume[:, :, a:a + roi[0], b:b + roi[1], c:c + roi[2]] for a, b, c in chunk])
        y = predict(x)
        if out is None:
            out = torch.zeros((1, y.shape[1], *full), device=volume.device)
        for j, (a, b, c) in enumerate(chunk):
            out[0, :, a:a + roi[0], b:b + roi[1], c:c + roi[2]] += y[j] * weight
            norm[a:a + roi[0], b:b + roi[1], c:c + roi[2]] += weight
    out /= norm
    if any(pad):
        sl = [slice(n // 2, n // 2 + s) for n, s in zip(pad, shape)]
        out = out[:, :, sl[0], sl[1], sl[2]]
    return out


def predict_scores(model: torch.nn.Module, case: Case, cfg: Config) -> torch.Tensor:
    """The model's output over the whole case, blended across sliding windows: (C, X, Y, Z).
    `cfg` gives the window (roi), the overlap, the blending, the device and mixed precision
    (the windows' passes autocast, their blending in float32)."""
    dtype = amp_dtype(cfg.device) if cfg.amp else None

    def predict(x: torch.Tensor) -> torch.Tensor:
        with autocast(cfg.device, dtype):
            return model(x).float()

    return sliding_window(
        predict, case.hu.to(cfg.device)[None, None], cfg.roi, cfg.overlap, cfg.blend
    )[0]


# ---------------------------------------------------------------------------------------
# From blended output to organ masks
# ---------------------------------------------------------------------------------------


def organ_masks(
    scores: torch.Tensor, organs: Sequence[str], scoring: str
) -> dict[str, torch.Tensor]:
    """Masks per organ from a model's blended output.

    "classes": (1 + K) class probabilities of a multi-class model, argmax. "merged": (K) organ
    probabilities of binary heads merged into one label map (`segviz.merge`, then argmax).
    "heads": each head alone, its organ's probability above 0.5 (masks may overlap).
    """
    if scoring == "heads":
        return {o: scores[k] > 0.5 for k, o in enumerate(organs)}
    labels = (merge(scores) if scoring == "merged" else scores).argmax(dim=0)
    return {o: labels == k + 1 for k, o in enumerate(organs)}


# How many connected components of each organ anatomy allows (kidneys: left and right).
COMPONENTS = {"liver": 1, "spleen": 1, "pancreas": 1, "kidneys": 2}


def keep_largest_components(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Keep the n largest 26-connected components of a boolean mask (a common clean-up)."""
    from scipy import ndimage

    labels, count = ndimage.label(mask.cpu().numpy(), structure=np.ones((3, 3, 3), bool))
    if count <= n:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:n] + 1
    return torch.from_numpy(np.isin(labels, keep)).to(mask.device)


def clean_masks(masks: dict[str, torch.Tensor], largest: bool) -> dict[str, torch.Tensor]:
    if not largest:
        return masks
    return {o: keep_largest_components(m, COMPONENTS[o]) for o, m in masks.items()}


def label_map(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """One ORGAN_ID label map from per-organ masks (an earlier organ wins a disputed voxel)."""
    first = next(iter(masks.values()))
    out = torch.zeros(first.shape, dtype=torch.uint8, device=first.device)
    for organ, mask in masks.items():
        out[mask & (out == 0)] = ORGAN_ID[organ]
    return out


def masks_of(scores: torch.Tensor, organs: Sequence[str], scoring: str, largest: bool
             ) -> dict[str, torch.Tensor]:
    """Each organ's mask from a model's blended output, cleaned up with `largest`."""
    return clean_masks(organ_masks(scores, organs, scoring), largest)


def segment(model: torch.nn.Module, case: Case, organs: Sequence[str], scorings: Sequence[str],
            cfg: Config) -> dict[str, dict[str, torch.Tensor]]:
    """The one inference path: each organ's mask on the case's working grid, for each way of
    scoring the model's output, from one blended sliding-window inference."""
    scores = predict_scores(model, case, cfg)
    return {scoring: masks_of(scores, organs, scoring, cfg.largest) for scoring in scorings}


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------


def case_scores(
    masks: dict[str, torch.Tensor],
    label: torch.Tensor,
    organs: Sequence[str],
    scoring: str,
    spacing: Sequence[float],
    surface: bool = True,
) -> dict[str, list[float]]:
    """Dice, HD95 (mm) and NSD (at NSD_TOLERANCE_MM) of each organ on one case, in `organs`
    order (Dice alone without `surface`); both surface metrics come from one surface distance
    computation per organ, in the case's voxel spacing. Empty masks follow metrics.py (MONAI's
    rule): HD95 nan when either mask is empty, NSD nan when both are."""
    if scoring == "heads":  # binary heads' masks may overlap: one organ at a time
        predicted = {organ: masks[organ] for organ in organs}
        dices = [dice(predicted[organ], label == ORGAN_ID[organ]) for organ in organs]
    else:
        labels = label_map(masks)
        by_id = label_dice(labels, label, max(ORGAN_ID.values()))
        dices = [by_id[ORGAN_ID[organ] - 1] for organ in organs]
        predicted = {organ: labels == ORGAN_ID[organ] for organ in organs}
    if not surface:
        return {"dice": dices}
    scores = {"dice": dices, "hd95": [], "nsd": []}
    truth = label.cpu()
    for organ in organs:
        distances = surface_distances(predicted[organ].cpu(), truth == ORGAN_ID[organ], spacing)
        scores["hd95"].append(hd95_from_distances(*distances))
        scores["nsd"].append(surface_dice_from_distances(*distances, NSD_TOLERANCE_MM))
    return scores


Scores = dict[str, dict[str, dict[str, list[float]]]]  # {scoring: {metric: {organ: [per case]}}}


def evaluate(
    model: torch.nn.Module,
    cases: Sequence[Case],
    organs: Sequence[str],
    scorings: Sequence[str],
    cfg: Config,
    surface: bool = True,
) -> Scores:
    """Dice, HD95 and NSD per organ per case of a HU-in model, for each way its output is scored
    (`segviz.MODES`), from one inference per case (`segment`): {scoring: {"dice" | "hd95" |
    "nsd": {organ: [value per case]}}}. Without `surface`, Dice alone (validation during
    training reads nothing else)."""
    model = model.to(cfg.device).eval()
    metrics = METRICS if surface else ("dice",)
    result = {s: {metric: {o: [] for o in organs} for metric in metrics} for s in scorings}
    for case in tqdm(cases, desc="evaluate", leave=False, disable=None):
        label = case.label.to(cfg.device)
        for scoring, masks in segment(model, case, organs, scorings, cfg).items():
            for metric, values in case_scores(
                masks, label, organs, scoring, case.spacing, surface
            ).items():
                for organ, value in zip(organs, values):
                    result[scoring][metric][organ].append(value)
    return result


# ---------------------------------------------------------------------------------------
# python eval.py --checkpoint: test a trained model again
# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Test a model written by train.py again, on the test set it was tested on or "
        "another one (--data-root, --data test=PATH), with the run's test-time settings "
        "unless given. Scores go to CHECKPOINT's folder/eval/metrics.json."
    )
    p.add_argument("--checkpoint", required=True, help="model.pt written by train.py")
    add_arguments(p, only=("data_root", "data", "device", "amp", "overlap", "largest", "cache"))
    p.add_argument("--out", help="folder for metrics.json (default: CHECKPOINT's folder/eval)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    given = given_of(args)
    if "overlap" in given and not 0 <= given["overlap"] < 1:
        p.error("--overlap must be in [0, 1)")
    # its own folder: training's metrics.json beside the checkpoint stays as training wrote it
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    check_writable(out_dir, "--out")
    ckpt = read_checkpoint(args.checkpoint)
    cfg = config_of(ckpt, device=given.pop("device", "auto"), parser=p)
    if "data_root" in given or "data" in given:  # another test set: it replaces the run's sources
        given = {"data_root": None, "data": {}, **given}
    cfg = replace(cfg, **given)
    try:
        test = load_test_set(cfg)
    except DataError as e:
        fail(str(e))
    t0 = time.time()
    scorings = MODES[ckpt["mode"]].scorings
    per_case = evaluate(model_of(ckpt), test, ckpt["organs"], scorings, cfg)
    scored = scored_metrics(per_case, scorings[0], [c.name for c in test])
    print(format_metric_tables({ckpt["name"]: scored["by_scoring"][scorings[0]]}, ckpt["organs"]))
    metrics = {
        "mode": ckpt["mode"],
        "nodes": ckpt["nodes"],
        "organs": ckpt["organs"],
        **scored,
        "seconds": round(time.time() - t0, 1),
        "checkpoint": os.path.abspath(args.checkpoint),
        "test_set": {"data_root": cfg.data_root, "data": cfg.data, "seed": cfg.seed},
        "settings": {
            "overlap": cfg.overlap,
            "largest": cfg.largest,
            "roi": list(cfg.roi),
            "blend": cfg.blend,
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
