"""Summaries and tables of scores: per organ, the mean and spread over a run's test cases, over
seeds, and the tables train.py prints and experiments compare.

A "summary" is {"mean", "std", "cases": [one value per case]} for one organ and metric; None
stands for a value that is undefined (HD95 beside an empty mask) and is left out of means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from data import ORGAN_ID
from metrics import METRICS, NSD_TOLERANCE_MM


def summarise(per_case: dict[str, list[float]]) -> dict[str, dict]:
    """Per organ: mean and population std over the cases whose value is finite, and every case's
    value (None where undefined: HD95 beside an empty mask); "nan" counts those cases, if any."""
    out = {}
    for organ, values in per_case.items():
        t = torch.tensor(values, dtype=torch.float64)
        finite = t[torch.isfinite(t)]
        entry = {
            "mean": float(finite.mean()) if len(finite) else None,
            "std": float(finite.std(unbiased=False))
            if len(finite) > 1
            else 0.0
            if len(finite)
            else None,
            "cases": [round(v, 6) if math.isfinite(v) else None for v in values],
        }
        if len(finite) < len(t):
            entry["nan"] = len(t) - len(finite)
        out[organ] = entry
    return out


def summarise_metrics(per_case: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict]]:
    """`summarise` of each metric of one scoring: {"dice" | "hd95" | "nsd": {organ: summary}}."""
    return {metric: summarise(values) for metric, values in per_case.items()}


def scored_metrics(per_case: dict[str, dict[str, dict[str, list[float]]]], primary: str,
                   case_names: list[str]) -> dict:
    """What metrics.json holds of an evaluation: "dice", "hd95" and "nsd" of the primary scoring
    ({organ: summary} each), "by_scoring" {scoring: {metric: {organ: summary}}} of all, and
    "case_names", the case of each position of the per-case lists."""
    by_scoring = {kind: summarise_metrics(values) for kind, values in per_case.items()}
    main = by_scoring.get(primary, {})
    return {**{metric: main.get(metric, {}) for metric in METRICS}, "scoring": primary,
            "nsd_tolerance_mm": NSD_TOLERANCE_MM, "by_scoring": by_scoring,
            "case_names": list(case_names)}


def across_seeds(per_seed: list[dict], organ: str) -> dict | None:
    """Mean ± std over seeds of each seed's mean over its cases, and every (seed, case) value.

    Means are over finite values: a case without a value (None; HD95 beside an empty mask) is
    left out of its seed's mean and counted in "nan"; a seed without any is left out of the mean
    over seeds."""
    if any(organ not in d for d in per_seed):
        return None
    means = np.array(
        [np.nan if d[organ]["mean"] is None else d[organ]["mean"] for d in per_seed], float
    )
    finite = means[np.isfinite(means)]
    cases = [list(d[organ]["cases"]) for d in per_seed]
    entry = {
        "mean": float(finite.mean()) if len(finite) else None,
        "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0 if len(finite) else None,
        "seeds": [round(float(v), 6) if np.isfinite(v) else None for v in means],
        "cases": cases,
    }
    nan = sum(v is None or not math.isfinite(v) for c in cases for v in c)
    if nan:
        entry["nan"] = nan
    return entry


def format_cell(d: dict | None, digits: int = 3) -> str:
    """mean ± std, "(n nan)" when some cases had no value, "nan" when none had, "—" if not scored.
    """
    if d is None:
        return "—"
    nan = f" ({d['nan']} nan)" if d.get("nan") else ""
    if d["mean"] is None:
        return "nan" + nan
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}{nan}"


def format_table(
    rows: dict[str, dict[str, dict]], organs: Sequence[str] = tuple(ORGAN_ID), digits: int = 3
) -> str:
    """Rows = models, columns = organs, cells = mean ± std (— where not trained)."""
    cells = {
        name: [format_cell(by_organ.get(o), digits) for o in organs]
        for name, by_organ in rows.items()
    }
    widths = [max([13, *(len(c[i]) for c in cells.values())]) for i in range(len(organs))]
    head = f"| {'model':<22} | " + " | ".join(f"{o:^{w}}" for o, w in zip(organs, widths)) + " |"
    sep = "|" + "-" * 24 + "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    lines = [head, sep]
    for name, row in cells.items():
        lines.append(
            f"| {name:<22} | " + " | ".join(f"{c:^{w}}" for c, w in zip(row, widths)) + " |"
        )
    return "\n".join(lines)


METRIC_TITLES = {"dice": "Dice", "hd95": "HD95 in mm (mean over cases where both masks exist)",
                 "nsd": f"NSD at {NSD_TOLERANCE_MM:g} mm"}
METRIC_DIGITS = {"dice": 3, "hd95": 1, "nsd": 3}


def format_metric_tables(rows: dict[str, dict[str, dict[str, dict]]], organs: Sequence[str]) -> str:
    """The Dice table, then HD95 and NSD tables under titles: rows = {model: {metric: {organ:
    summary}}}."""
    parts = []
    for metric in METRICS:
        if not any(metric in r for r in rows.values()):
            continue
        table = format_table(
            {name: r.get(metric, {}) for name, r in rows.items()}, organs, METRIC_DIGITS[metric]
        )
        parts.append(table if metric == "dice" else f"{METRIC_TITLES[metric]}\n{table}")
    return "\n\n".join(parts)
