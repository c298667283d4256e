"""`python -m experiments compare DIR`: every finished run under DIR as tables over seeds (Dice,
HD95, NSD), each setup against SegViz; and `table DIR`, one row per run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from common import fail, write_json_atomic, write_text_atomic
from metrics import METRICS
from report import METRIC_DIGITS, METRIC_TITLES, across_seeds, format_cell, format_table

# report.scored_metrics's keys
TEST_KEYS = (*METRICS, "by_scoring", "scoring", "nsd_tolerance_mm", "case_names")


def read_runs(folder: str) -> dict[str, list[dict]]:
    """Every finished training run under `folder` (DIR/metrics.json, DIR/*/metrics.json or
    DIR/*/*/metrics.json), by setup name, its seeds in order. Each metrics dict gains "dir". A run
    trained with --no-test gains the test scores `python eval.py --checkpoint` wrote into its eval/
    folder, if any (the way to read the test set once, after choosing on validation)."""
    if not os.path.isdir(folder):
        fail(f"{folder}: no such folder")
    runs: dict[str, list[dict]] = {}
    paths = [os.path.join(folder, "metrics.json")]
    for d in sorted(os.listdir(folder)):
        paths.append(os.path.join(folder, d, "metrics.json"))
        if os.path.isdir(os.path.join(folder, d)):
            paths += [
                os.path.join(folder, d, e, "metrics.json")
                for e in sorted(os.listdir(os.path.join(folder, d)))
            ]
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                m = json.load(f)
            if "checkpoint" in m:  # a re-evaluation written by eval.py, not a training run
                continue
            later = os.path.join(os.path.dirname(path), "eval", "metrics.json")
            if not m.get("dice") and os.path.isfile(later):  # trained with --no-test, scored later
                with open(later) as f:
                    m = {**m, **{k: v for k, v in json.load(f).items() if k in TEST_KEYS}}
            runs.setdefault(m["name"], []).append({**m, "dir": os.path.dirname(path)})
        except (OSError, ValueError, KeyError) as e:
            fail(f"{path}: not a metrics file written by train.py ({e})")
    if not runs:
        fail(f"{folder}: no run folder with a metrics.json")
    return {name: sorted(ms, key=lambda m: m["seed"]) for name, ms in runs.items()}


def significance(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank test of paired Dice values; p and the poster's mark
    (** p < 0.01, * p < 0.05, ns otherwise). Identical samples give p = 1."""
    from scipy.stats import wilcoxon

    diff = np.asarray(a, float) - np.asarray(b, float)
    if len(diff) < 2 or np.allclose(diff, 0):
        return 1.0, "ns"
    p = float(wilcoxon(a, b).pvalue)
    return p, "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def scored_rows(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """One row per setup and scoring: "segviz-4" (its merged label map) and "segviz-4 (heads)",
    "single-4" (each head alone) and "single-4 (merged)"; each row's {metric: {organ: summary}}
    per seed."""
    rows = {}
    for name, seeds in runs.items():
        by = [m["by_scoring"] for m in seeds]
        primary = seeds[0]["scoring"]
        for scoring in sorted(by[0], key=lambda k: k != primary):
            rows[name if scoring == primary else f"{name} ({scoring})"] = [b[scoring] for b in by]
    return rows


def compare_runs(folder: str) -> str:
    """results.md and results.json under `folder`: per setup and organ, mean ± std over seeds of
    Dice (each setup against SegViz with the same number of nodes: Wilcoxon over matched (seed,
    test case) pairs), then of HD95 and NSD. results.json: {row: {organ: Dice entry, with its
    "hd95" and "nsd" entries inside}}."""
    runs = {
        name: scored
        for name, ms in read_runs(folder).items()
        if (scored := [m for m in ms if m.get("dice")])
    }
    if not runs:
        fail(
            f"{folder}: no run with test scores (train.py's, or eval.py's in a --no-test run's "
            "eval/ folder)"
        )
    rows = scored_rows(runs)
    nodes_of = {row: runs[row.split(" ")[0]][0]["nodes"] for row in rows}
    result, lines = {}, []
    for nodes in sorted(set(nodes_of.values())):
        group = [row for row in rows if nodes_of[row] == nodes]
        organs = max((runs[row.split(" ")[0]][0]["organs"] for row in group), key=len)
        ref = rows.get(f"segviz-{nodes}")
        n_seeds = sorted({len(rows[row]) for row in group})
        lines += [f"### {nodes} node(s), {'/'.join(map(str, n_seeds))} seed(s)", ""]
        for metric in METRICS:
            per_row = {row: [seed.get(metric, {}) for seed in rows[row]] for row in group}
            if metric != "dice":
                lines += [f"{METRIC_TITLES[metric]}, mean ± std over seeds:", ""]
            lines += ["| setup | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
            for row in group:
                cells = []
                if metric == "dice":
                    result[row] = {}
                for organ in organs:
                    entry = across_seeds(per_row[row], organ)
                    if entry is None:
                        cells.append("—")
                        continue
                    mark = ""
                    if metric == "dice":
                        mark = compare_to_segviz(
                            entry, per_row[row], ref, organ, row == f"segviz-{nodes}"
                        )
                        result[row][organ] = entry
                    elif organ in result[row]:
                        result[row][organ][metric] = entry
                    cells.append(
                        format_cell(entry, METRIC_DIGITS[metric]) + (f" {mark}" if mark else "")
                    )
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
            lines.append("")
    lines.append(
        "Cells: mean ± std over seeds of each seed's mean over the test cases. Marks: each row "
        "against SegViz (merged) with the same nodes, two-sided Wilcoxon signed-rank test of Dice "
        "over matched (seed, test case) pairs (** p < 0.01, * p < 0.05, ns not significant). HD95 "
        "has no value where the prediction or the truth is empty (MONAI's rule): its means are "
        'over the other cases, and "(n nan)" counts the (seed, case) pairs without one.'
    )
    text = "\n".join(lines)
    write_text_atomic(os.path.join(folder, "results.md"), text + "\n")
    write_json_atomic(os.path.join(folder, "results.json"), result)
    return text


def compare_to_segviz(
    entry: dict, mine: list[dict], ref: list[dict] | None, organ: str, is_ref: bool
) -> str:
    """The Wilcoxon mark of a row's Dice against SegViz's (p stored in `entry`); "" if not compared.
    """
    if ref is None or is_ref or len(ref) != len(mine):
        return ""
    theirs = across_seeds([seed["dice"] for seed in ref], organ)
    if theirs is None:
        return ""
    a = [v for case in entry["cases"] for v in case]
    b = [v for case in theirs["cases"] for v in case]
    if len(a) != len(b):
        return ""
    p, mark = significance(a, b)
    entry.update(p_vs_segviz=p, mark=mark)
    return mark


def table_of_runs(folder: str) -> str:
    """The Dice table (plus wall time) of every finished run in a folder."""
    runs = read_runs(folder)
    flat = [(f"{name} seed {m.get('seed', 0)}", m) for name, ms in runs.items() for m in ms]
    table = format_table({label: m["dice"] for label, m in flat}).splitlines()
    table[0] += " seconds |"
    table[1] += "---------|"
    for i, (_, m) in enumerate(flat):
        table[i + 2] += f" {m['seconds']:>7.0f} |"
    return "\n".join(table)
