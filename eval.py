"""Evaluation: sliding-window inference over whole volumes, Dice, HD95 and NSD per organ, result tables.

`python eval.py --checkpoint OUT/model.pt` rebuilds the model and the test set from what the
checkpoint holds and prints the tables again. `python eval.py predict -i SCANS -o LABELS
--checkpoint OUT/model.pt` segments every scan of a folder on its own grid (predict.py). Dice: an
empty prediction against an empty truth scores 1 (MONAI's DiceMetric with ignore_empty=False;
its default leaves such a case out), exactly one empty scores 0. HD95 and NSD follow MONAI's
rules (metrics.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from common import check_writable, fail, resolve_device, write_json_atomic
from data import ORGAN_ID, Case
from metrics import hd95_from_distances, surface_dice_from_distances, surface_distances
from segviz import BINARY, MetaModel, merge

CHECKPOINT_FORMAT = "segviz-checkpoint/1"
METRICS = ("dice", "hd95", "nsd")
NSD_TOLERANCE_MM = 2.0  # normalised surface Dice: a surface voxel within 2 mm of the other surface counts

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
def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor, roi: Sequence[int],
                   overlap: float = 0.25, blend: str = "gaussian", batch: int = 4,
                   pad_value: float = -1024.0) -> torch.Tensor:
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
    corners = [(a, b, c) for a in _starts(full[0], roi[0], overlap) for b in _starts(full[1], roi[1], overlap)
               for c in _starts(full[2], roi[2], overlap)]
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


# ---------------------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------------------


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two boolean masks; 1 when both are empty, 0 when exactly one is."""
    p, t = pred.bool(), truth.bool()
    ps, ts = int(p.sum()), int(t.sum())
    if ps == 0 and ts == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / (ps + ts)


def label_dice(pred: torch.Tensor, truth: torch.Tensor, classes: int) -> list[float]:
    """Dice of labels 1..classes between two integer label maps, from one confusion count.

    One pass over the voxels instead of one per organ (what `dice` on each organ's masks
    does); the same values, with the same empty-mask rule.
    """
    n = classes + 1
    if min(int(pred.min()), int(truth.min())) < 0 or max(int(pred.max()), int(truth.max())) >= n:
        raise ValueError(f"label_dice: labels must lie in 0..{classes}")
    # uint8 halves the memory traffic of int16 and is the fastest bincount input
    dtype = torch.uint8 if n * n <= 256 else torch.int64
    joint = pred.reshape(-1).to(dtype) * n + truth.reshape(-1).to(dtype)
    confusion = torch.bincount(joint, minlength=n * n).reshape(n, n).cpu()
    hits, predicted, true = confusion.diag(), confusion.sum(1), confusion.sum(0)
    return [1.0 if predicted[c] + true[c] == 0 else 2.0 * int(hits[c]) / int(predicted[c] + true[c])
            for c in range(1, n)]


def organ_masks(scores: torch.Tensor, organs: Sequence[str], scoring: str) -> dict[str, torch.Tensor]:
    """Masks per organ from a model's blended output.

    "classes": (1 + K) class probabilities of a multi-class model, argmax. "merged": (K) organ
    probabilities of binary heads merged into one label map (`segviz.merge`, then argmax).
    "heads": each head alone, its organ's probability above 0.5 (masks may overlap).
    """
    if scoring == "heads":
        return {o: scores[k] > 0.5 for k, o in enumerate(organs)}
    labels = (merge(scores) if scoring == "merged" else scores).argmax(dim=0)
    return {o: labels == k + 1 for k, o in enumerate(organs)}


def scorings(model: torch.nn.Module) -> tuple[str, ...]:
    """How a model's output can be read: binary heads both merged and alone, else by class."""
    return ("merged", "heads") if isinstance(model, MetaModel) else ("classes",)


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


def predict_scores(model: torch.nn.Module, case: Case, roi: Sequence[int], device: torch.device | str = "cpu",
                   overlap: float = 0.25, blend: str = "gaussian") -> torch.Tensor:
    """The model's output over the whole case, blended across sliding windows: (C, X, Y, Z)."""
    return sliding_window(model, case.hu.to(device)[None, None], roi, overlap, blend)[0]


def predict_masks(model: torch.nn.Module, case: Case, organs: Sequence[str], roi: Sequence[int],
                  scoring: str | None = None, device: torch.device | str = "cpu", overlap: float = 0.25,
                  blend: str = "gaussian", largest: bool = False) -> dict[str, torch.Tensor]:
    """Each organ's predicted mask on the case's working grid (scoring: the model's first)."""
    scores = predict_scores(model, case, roi, device, overlap, blend)
    return clean_masks(organ_masks(scores, organs, scoring or scorings(model)[0]), largest)


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


def case_scores(masks: dict[str, torch.Tensor], label: torch.Tensor, organs: Sequence[str], scoring: str,
                spacing: Sequence[float], surface: bool = True) -> dict[str, list[float]]:
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


def evaluate(model: torch.nn.Module, cases: Sequence[Case], organs: Sequence[str], roi: Sequence[int],
             device: torch.device | str = "cpu", overlap: float = 0.25, blend: str = "gaussian",
             largest: bool = False, save_pred: str | None = None, primary: str | None = None, surface: bool = True
             ) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Dice, HD95 and NSD per organ per test case of a HU-in model, for each way its output can be
    scored (`scorings`): {scoring: {"dice" | "hd95" | "nsd": {organ: [value per case]}}}, from one
    inference per case (`case_scores`). Without `surface`, Dice alone (validation during training
    reads nothing else).

    With `largest`, each organ's mask keeps only its largest connected component(s) first.
    With `save_pred`, each case's label map (`primary` scoring) is written there as <case>.nii.gz.
    """
    from predict import save_prediction  # predict.py builds on this module

    model = model.to(device).eval()
    kinds = scorings(model)
    primary = primary or kinds[0]
    result = {k: {metric: {o: [] for o in organs} for metric in (METRICS if surface else ("dice",))}
              for k in kinds}
    for case in tqdm(cases, desc="evaluate", leave=False, disable=None):
        scores = predict_scores(model, case, roi, device, overlap, blend)
        label = case.label.to(device)
        for kind in kinds:
            masks = clean_masks(organ_masks(scores, organs, kind), largest)
            for metric, values in case_scores(masks, label, organs, kind, case.spacing, surface).items():
                for organ, value in zip(organs, values):
                    result[kind][metric][organ].append(value)
            if save_pred and kind == primary:
                save_prediction(masks, case, os.path.join(save_pred, f"{case.name}.nii.gz"))
    return result


def summarise(per_case: dict[str, list[float]]) -> dict[str, dict]:
    """Per organ: mean and population std over the cases whose value is finite, and every case's
    value (None where undefined: HD95 beside an empty mask); "nan" counts those cases, if any."""
    out = {}
    for organ, values in per_case.items():
        t = torch.tensor(values, dtype=torch.float64)
        finite = t[torch.isfinite(t)]
        entry = {"mean": float(finite.mean()) if len(finite) else None,
                 "std": float(finite.std(unbiased=False)) if len(finite) > 1 else 0.0 if len(finite) else None,
                 "cases": [round(v, 6) if math.isfinite(v) else None for v in values]}
        if len(finite) < len(t):
            entry["nan"] = len(t) - len(finite)
        out[organ] = entry
    return out


def summarise_metrics(per_case: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict]]:
    """`summarise` of each metric of one scoring: {"dice" | "hd95" | "nsd": {organ: summary}}."""
    return {metric: summarise(values) for metric, values in per_case.items()}


def scored_metrics(per_case: dict[str, dict[str, dict[str, list[float]]]], primary: str) -> dict:
    """What metrics.json holds of an evaluation: "dice", "hd95" and "nsd" of the primary scoring
    ({organ: summary} each), and "by_scoring" {scoring: {metric: {organ: summary}}} of all."""
    by_scoring = {kind: summarise_metrics(values) for kind, values in per_case.items()}
    main = by_scoring.get(primary, {})
    return {**{metric: main.get(metric, {}) for metric in METRICS}, "scoring": primary,
            "nsd_tolerance_mm": NSD_TOLERANCE_MM, "by_scoring": by_scoring}


def across_seeds(per_seed: list[dict], organ: str) -> dict | None:
    """Mean ± std over seeds of each seed's mean over its cases, and every (seed, case) value.

    Means are over finite values: a case without a value (None; HD95 beside an empty mask) is
    left out of its seed's mean and counted in "nan"; a seed without any is left out of the mean
    over seeds."""
    if any(organ not in d for d in per_seed):
        return None
    means = np.array([np.nan if d[organ]["mean"] is None else d[organ]["mean"] for d in per_seed], float)
    finite = means[np.isfinite(means)]
    cases = [list(d[organ]["cases"]) for d in per_seed]
    entry = {"mean": float(finite.mean()) if len(finite) else None,
             "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0 if len(finite) else None,
             "seeds": [round(float(v), 6) if np.isfinite(v) else None for v in means], "cases": cases}
    nan = sum(v is None or not math.isfinite(v) for c in cases for v in c)
    if nan:
        entry["nan"] = nan
    return entry


def format_cell(d: dict | None, digits: int = 3) -> str:
    """mean ± std, "(n nan)" when some cases had no value, "nan" when none had, "—" if not scored."""
    if d is None:
        return "—"
    nan = f" ({d['nan']} nan)" if d.get("nan") else ""
    if d["mean"] is None:
        return "nan" + nan
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}{nan}"


def format_table(rows: dict[str, dict[str, dict]], organs: Sequence[str] = tuple(ORGAN_ID), digits: int = 3) -> str:
    """Rows = models, columns = organs, cells = mean ± std (— where not trained)."""
    cells = {name: [format_cell(by_organ.get(o), digits) for o in organs] for name, by_organ in rows.items()}
    widths = [max([13, *(len(c[i]) for c in cells.values())]) for i in range(len(organs))]
    head = f"| {'model':<22} | " + " | ".join(f"{o:^{w}}" for o, w in zip(organs, widths)) + " |"
    sep = "|" + "-" * 24 + "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = [head, sep]
    for name, row in cells.items():
        lines.append(f"| {name:<22} | " + " | ".join(f"{c:^{w}}" for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 in mm (mean over cases where both masks exist)",
                 "nsd": f"NSD at {NSD_TOLERANCE_MM:g} mm"}
METRIC_DIGITS = {"dice": 3, "hd95": 1, "nsd": 3}


def format_metric_tables(rows: dict[str, dict[str, dict[str, dict]]], organs: Sequence[str]) -> str:
    """The Dice table, then HD95 and NSD tables under titles: rows = {model: {metric: {organ: summary}}}."""
    parts = []
    for metric in METRICS:
        if not any(metric in r for r in rows.values()):
            continue
        table = format_table({name: r.get(metric, {}) for name, r in rows.items()}, organs, METRIC_DIGITS[metric])
        parts.append(table if metric == "dice" else f"{METRIC_TITLES[metric]}\n{table}")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by train.py, loaded without unpickling code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"checkpoint {path}: no such file")
    except Exception as e:  # truncated, not a torch file, or unsafe content
        fail(f"checkpoint {path}: cannot be read ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        fail(f"checkpoint {path}: not a checkpoint written by train.py")
    return ckpt


def primary_scoring(mode: str) -> str:
    """The scoring a mode's table reports first: single-site models each on their own organ
    (the paper's A), the SegViz meta-model's merged label map, multi-class models by class."""
    return {"single": "heads", "segviz": "merged"}.get(mode, "classes")


def sliding_settings(cfg: dict, args: argparse.Namespace | None = None) -> tuple[list[int], float, str]:
    """Window size, overlap and blending of the sliding window, as the training run tested its
    model (the preset's roi, config.EVAL_OVERLAP and the preset's blend; the overlap may be given
    on the command line); checkpoints older than those settings get their defaults of the time."""
    overlap = getattr(args, "overlap", None)
    return (list(cfg.get("roi") or cfg["patch"]), cfg.get("eval_overlap", 0.25) if overlap is None else overlap,
            cfg.get("blend", "gaussian"))


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """The HU-in model of a checkpoint."""
    from segviz import MultiClassModel
    from unet3d import UNetConfig

    cfg = ckpt["config"]
    net_cfg = UNetConfig.from_dict(cfg["unet"])
    mode = ckpt["mode"]
    if mode in BINARY:  # each head through its own site's window, as it trained
        windows = {site: cfg["windows"][site] for site in ckpt["states"]}
        return MetaModel(net_cfg, ckpt["states"], windows, shared_rep=cfg["shared_rep"])
    # a multi-class model trained through one window at every site
    return MultiClassModel(net_cfg, ckpt["states"]["global"], next(iter(cfg["windows"].values())))


# ---------------------------------------------------------------------------------------
# python eval.py --checkpoint: test a trained model again
# ---------------------------------------------------------------------------------------


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """How a checkpoint's model is run: the flags re-evaluation and `predict` share."""
    p.add_argument("--device", default="auto",
                   help="auto (CUDA, else MPS, else CPU; default), cpu, cuda[:N] or mps")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in [0, 1) (default: as the training run tested, 0.25)")
    p.add_argument("--largest", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each organ's largest connected component(s) (default: as the training run)")


def main(argv: list[str] | None = None) -> int:
    from config import add_source_arguments, default_cache

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        from predict import main as predict_main

        return predict_main(argv[1:])
    p = argparse.ArgumentParser(description="Re-evaluate a checkpoint written by train.py on its test set (or "
                                            "another one). `python eval.py predict -h`: segment a folder of scans.")
    p.add_argument("--checkpoint", required=True, help="model.pt written by train.py")
    add_source_arguments(p, roles=("test",))
    p.add_argument("--save-pred", metavar="DIR",
                   help="write each test case's label map (BTCV ids: 1 spleen, 2 right kidney, 3 left kidney, "
                        "6 liver, 11 pancreas) on the original scan's grid into this folder")
    add_inference_arguments(p)
    p.add_argument("--out", default=None, help="where to write metrics.json (default: CHECKPOINT's folder/eval)")
    p.add_argument("--cache", default=default_cache(),
                   help="folder for preprocessed volumes (default ~/.cache/segviz or $SEGVIZ_CACHE)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that preprocess real data")
    args = p.parse_args(argv)
    if args.overlap is not None and not 0 <= args.overlap < 1:
        p.error("--overlap must be in [0, 1)")
    device = resolve_device(args.device, p)
    # its own folder: training's metrics.json beside the checkpoint stays as training wrote it
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    if args.save_pred:
        check_writable(args.save_pred, "--save-pred")
    check_writable(out_dir, "--out")
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt["config"]
    model = model_from_checkpoint(ckpt)
    primary = primary_scoring(ckpt["mode"])
    organs = ckpt["organs"]
    largest = cfg.get("largest", False) if args.largest is None else args.largest
    test = load_test_set(cfg, args)
    t0 = time.time()
    roi, overlap, blend = sliding_settings(cfg, args)
    per_case = evaluate(model, test, organs, roi, device, overlap, blend, largest,
                        save_pred=args.save_pred, primary=primary)
    scored = scored_metrics(per_case, primary)
    print(format_metric_tables({ckpt["name"]: scored["by_scoring"][primary]}, organs))
    if args.save_pred:
        print(f"{len(test)} label map(s) written to {args.save_pred}")
    metrics = {"mode": ckpt["mode"], "nodes": ckpt["nodes"], "organs": organs, **scored,
               "seconds": round(time.time() - t0, 1), "config": cfg, "checkpoint": os.path.abspath(args.checkpoint),
               "test_cases": [c.name for c in test]}
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    return 0


def cases_source(cfg: dict) -> dict:
    """Where a checkpoint's cases came from: {"source": "phantom"}, or real data's roots, layouts
    and validation cases (config.source; checkpoints before the Config dataclass: config.data)."""
    return cfg.get("source") or cfg.get("data") or {"source": "phantom"}


def checkpoint_cache(cfg: dict) -> str | None:
    """The cache folder a checkpoint's run used (checkpoints before the Config dataclass: cache_dir)."""
    return cfg.get("cache", cfg.get("cache_dir"))


def load_test_set(cfg: dict, args: argparse.Namespace) -> list[Case]:
    """The test set named on the command line, else the one the checkpoint was tested on."""
    from archives import find_dataset, find_sources
    from data import DataError
    from datasets import check_labelled, load_source
    from phantom import PhantomSpec, phantom_federation

    data = cases_source(cfg)
    spacing = tuple(cfg["spacing"])
    try:
        if args.data_root or dict(args.data):
            source = find_sources(("test",), args.data_root, dict(args.data))["test"]
        elif data.get("source") == "real":
            source = find_dataset(data["roots"]["test"], "test")
        else:
            spec = PhantomSpec(cases=cfg["phantom_cases"], spacing=spacing)
            return phantom_federation((), seed=cfg["seed"], spec=spec, cache_dir=checkpoint_cache(cfg))[1]
        cases = load_source(source, spacing, args.cache, args.workers, cfg.get("max_cases"))
        check_labelled(cases, source)
        return cases
    except DataError as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
