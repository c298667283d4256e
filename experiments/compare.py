"""`python -m experiments compare DIR`: every finished run under DIR as tables over seeds, each
setup against SegViz scored the same way; and `table DIR`, one row per run.

Rows: a multi-class setup has one (its argmax), a setup of binary site models two, `(merged)`
(the heads merged into one label map, as the meta-model) and `(heads)` (each head alone on its
organ). A row is compared with SegViz scored as it is: `(heads)` rows with `segviz (heads)`,
the others with `segviz (merged)`. Cells: mean ± std over seeds of each seed's mean over the
test cases, per organ and for the mean over the organs. The comparison (experiments/stats.py):
the difference of the means with a 95 % interval from a hierarchical bootstrap (seeds, then
cases within each seed), pairs matched by (seed, case name), and its p-value adjusted by Holm's
method across the table; `*` marks an adjusted p below 0.05.
"""

from __future__ import annotations

import json
import os

import numpy as np

from common import fail, write_json_atomic, write_text_atomic
from experiments import stats
from metrics import METRICS
from report import METRIC_DIGITS, METRIC_TITLES, across_seeds, format_cell, format_table
from segviz import MODES

# report.scored_metrics's keys
TEST_KEYS = (*METRICS, "by_scoring", "scoring", "nsd_tolerance_mm", "case_names")
CHOICES = "choices.json"  # a suite's choice of run folder per setup (its tuned learning rate)
MEAN = "mean"  # the column of the mean over the organs


def run_folders(folder: str) -> list[str]:
    """The folders under `folder` that may hold a finished run: those a suite chose (its
    choices.json), else DIR, DIR/* and DIR/*/* ."""
    chosen = os.path.join(folder, CHOICES)
    if os.path.isfile(chosen):
        with open(chosen) as f:
            picks = json.load(f)["runs"]
        return [os.path.join(folder, p, d) for p in picks.values()
                for d in sorted(os.listdir(os.path.join(folder, p)))]
    found = [folder]
    for d in sorted(os.listdir(folder)):
        path = os.path.join(folder, d)
        if os.path.isdir(path):
            found += [path, *(os.path.join(path, e) for e in sorted(os.listdir(path)))]
    return found


def read_runs(folder: str) -> dict[str, list[dict]]:
    """Every finished training run under `folder`, by setup name, its seeds in order. Each
    metrics dict gains "dir". A run trained with --no-test gains the test scores
    `python eval.py --checkpoint` wrote into its eval/ folder, if any (the way to read the test
    set once, after choosing on validation)."""
    if not os.path.isdir(folder):
        fail(f"{folder}: no such folder")
    runs: dict[str, list[dict]] = {}
    for run_dir in run_folders(folder):
        path = os.path.join(run_dir, "metrics.json")
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                m = json.load(f)
            if "checkpoint" in m:  # a re-evaluation written by eval.py, not a training run
                continue
            later = os.path.join(run_dir, "eval", "metrics.json")
            if not m.get("dice") and os.path.isfile(later):  # trained with --no-test, scored later
                with open(later) as f:
                    m = {**m, **{k: v for k, v in json.load(f).items() if k in TEST_KEYS}}
            runs.setdefault(m["name"], []).append({**m, "dir": run_dir})
        except (OSError, ValueError, KeyError) as e:
            fail(f"{path}: not a metrics file written by train.py ({e})")
    if not runs:
        fail(f"{folder}: no run folder with a metrics.json")
    return {name: sorted(ms, key=lambda m: m["seed"]) for name, ms in runs.items()}


def scored_rows(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """One row per setup and scoring, named by both for binary models ("segviz-4 (merged)",
    "segviz-4 (heads)"); each row's list of its seeds' metrics, the scoring's in "scores"."""
    rows = {}
    for name, seeds in runs.items():
        scorings = MODES[seeds[0]["mode"]].scorings
        for scoring in scorings:
            row = name if len(scorings) == 1 else f"{name} ({scoring})"
            rows[row] = [
                {**m, "scoring": scoring, "scores": m["by_scoring"][scoring]} for m in seeds
            ]
    return rows


def reference_row(row: str, nodes: int) -> str:
    """The SegViz row a row is compared with: scored as it is."""
    return f"segviz-{nodes} (heads)" if row.endswith("(heads)") else f"segviz-{nodes} (merged)"


def by_case(seeds: list[dict], metric: str, organs: list[str]) -> dict[str, dict[int, dict]]:
    """{organ or MEAN: {seed: {case name: value}}} of one row; MEAN is each case's mean over the
    organs."""
    out: dict[str, dict[int, dict]] = {o: {} for o in (*organs, MEAN)}
    for m in seeds:
        names = m.get("case_names")
        if not names:
            fail(
                f"{m['dir']}: its metrics.json names no test cases; evaluate it again with eval.py"
            )
        per_organ = {o: m["scores"][metric][o]["cases"] for o in organs}
        for o in organs:
            out[o][m["seed"]] = dict(zip(names, per_organ[o]))
        out[MEAN][m["seed"]] = {n: mean_over(per_organ[o][i] for o in organs)
                                for i, n in enumerate(names)}
    return out


def mean_over(values: object) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def summary(per_seed: dict[int, dict]) -> dict:
    """mean ± std over seeds of each seed's mean, as report.across_seeds gives for an organ."""
    seeds = [{"x": {"mean": mean_over(cases.values()), "cases": list(cases.values())}}
             for cases in per_seed.values()]
    return across_seeds(seeds, "x")


def compare_runs(folder: str) -> str:
    """results.md and results.json under `folder`: per number of nodes, the Dice table with each
    row's difference to SegViz (95 % interval, Holm-adjusted marks), then HD95 and NSD."""
    runs = {
        name: done
        for name, ms in read_runs(folder).items()
        if (done := [m for m in ms if m.get("dice")])
    }
    if not runs:
        fail(f"{folder}: no run with test scores (train.py's, or eval.py's in a --no-test run's "
             "eval/ folder)")
    rows = scored_rows(runs)
    result, lines = {}, []
    for nodes in sorted({seeds[0]["nodes"] for seeds in rows.values()}):
        group = {row: seeds for row, seeds in rows.items() if seeds[0]["nodes"] == nodes}
        organs = max((seeds[0]["organs"] for seeds in group.values()), key=len)
        seed_counts = "/".join(map(str, sorted({len(s) for s in group.values()})))
        lines += [f"### {nodes} node(s), {seed_counts} seed(s)", ""]
        dice = {row: by_case(seeds, "dice", organs) for row, seeds in group.items()}
        tests = differences(dice, nodes, organs)
        lines += dice_tables(group, dice, tests, organs, result)
        for metric in METRICS[1:]:
            lines += [f"{METRIC_TITLES[metric]}, mean ± std over seeds:", "",
                      *metric_table(group, metric, organs, result)]
    lines.append(__doc__.split("\n\n", 1)[1].strip().replace("\n", " "))
    text = "\n".join(lines)
    write_text_atomic(os.path.join(folder, "results.md"), text + "\n")
    write_json_atomic(os.path.join(folder, "results.json"), result)
    return text


def differences(
    dice: dict[str, dict], nodes: int, organs: list[str]
) -> dict[tuple[str, str], dict]:
    """(row, organ or MEAN) -> its comparison with the SegViz row scored as it, Holm-adjusted
    across the table."""
    tests = {}
    for row, per in dice.items():
        ref = reference_row(row, nodes)
        if row == ref or ref not in dice:
            continue
        for col in (*organs, MEAN):
            if per[col] and dice[ref][col]:
                try:
                    tests[(row, col)] = stats.compare(per[col], dice[ref][col])
                except stats.Mismatch as e:
                    fail(f"compare: {row} and {ref} ({col}) were not scored on the same (seed, "
                         f"case) pairs: {e}")
    keys = list(tests)
    for key, p in zip(keys, stats.holm([tests[k]["p"] for k in keys])):
        tests[key]["p_holm"] = p
    return tests


def dice_tables(group: dict, dice: dict, tests: dict, organs: list[str], result: dict) -> list[str]:
    """The Dice table (mean ± std over seeds) and the table of differences to SegViz."""
    head = ["| setup | " + " | ".join([*organs, "mean over organs"]) + " |",
            "|---|" + "---|" * (len(organs) + 1)]
    means, diffs = list(head), list(head)
    for row in group:
        cells, dcells = [], []
        result[row] = {}
        for col in (*organs, MEAN):
            entry = summary(dice[row][col]) if dice[row][col] else None
            cells.append(format_cell(entry))
            test = tests.get((row, col))
            if entry is not None:
                result[row][col] = {**entry, **({"vs_segviz": test} if test else {})}
            dcells.append(format_difference(test))
        means.append(f"| {row} | " + " | ".join(cells) + " |")
        diffs.append(f"| {row} | " + " | ".join(dcells) + " |")
    return [
        "Dice, mean ± std over seeds:",
        "",
        *means,
        "",
        "Dice, difference to SegViz scored alike [95 % interval], * Holm-adjusted p < 0.05:",
        "",
        *diffs,
        "",
    ]


def format_difference(test: dict | None) -> str:
    if test is None or test["difference"] is None:
        return "—"
    return (f"{test['difference']:+.3f} [{test['low']:+.3f}, {test['high']:+.3f}]"
            f"{stats.mark(test['p_holm'])}")


def metric_table(group: dict, metric: str, organs: list[str], result: dict) -> list[str]:
    lines = ["| setup | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
    for row, seeds in group.items():
        cells = []
        for organ in organs:
            entry = across_seeds([m["scores"].get(metric, {}) for m in seeds], organ)
            cells.append(format_cell(entry, METRIC_DIGITS[metric]))
            if entry is not None and organ in result.get(row, {}):
                result[row][organ][metric] = entry
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def table_of_runs(folder: str) -> str:
    """The Dice table (plus wall time) of every finished run in a folder."""
    runs = read_runs(folder)
    flat = [(f"{name} seed {m['seed']}", m) for name, ms in runs.items() for m in ms]
    table = format_table({label: m["dice"] for label, m in flat}).splitlines()
    table[0] += " seconds |"
    table[1] += "---------|"
    for i, (_, m) in enumerate(flat):
        table[i + 2] += f" {m['seconds']:>7.0f} |"
    return "\n".join(table)
