"""Experiments around SegViz: comparing setups, figures, and choosing defaults on validation.

    python experiments.py suite --out DIR [--nodes 2 3 4] [--seeds 0 1 2] [train.py flags]
    python experiments.py compare DIR [--figures]    # results.md/json: every setup over seeds, Wilcoxon marks
    python experiments.py table DIR                  # one row per finished run (and seed)
    python experiments.py validation DIR [DIR ...]   # each candidate's validation Dice over seeds
    python experiments.py eval-options DIR [DIR ...] # blending and clean-up, scored on validation

`suite` trains the paper's figure 2 (single, central, fedavg, segviz), SegViz with FedBN, the
central and FedAvg models with the marginal loss, and the oracle (phantom only), for every node
count and seed, each as its own `python train.py` process writing DIR/<setup>[/seed-S]; a
finished run is skipped and an unfinished one resumed, so the command can simply be issued
again; then it compares them. `compare` reads every finished run under DIR (DIR/<setup>/metrics.json or
DIR/<setup>/seed-S/metrics.json, as `suite` writes them). A candidate for
`validation` is a folder of runs trained with `train.py --no-test --seeds ...` (one folder per
seed under it): it tabulates each site's Dice on its own validation cases at the last check,
mean ± std over seeds. `eval-options` rebuilds each run's per-site models from its checkpoint
and scores the validation cases again under each test-time option (Gaussian or constant
blending, with or without the largest-component clean-up). docs/choices.md records what was
chosen this way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from common import check_writable, fail, resolve_device, write_json_atomic, write_text_atomic
from data import NODE_SITES, ORGAN_ID, Case, window
from eval import (
    METRIC_DIGITS,
    METRIC_TITLES,
    METRICS,
    evaluate,
    format_cell,
    format_table,
    label_map,
    load_checkpoint,
    load_test_set,
    model_from_checkpoint,
    predict_masks,
    primary_scoring,
    sliding_settings,
)
from segviz import MetaModel, MultiClassModel
from unet3d import UNetConfig

if TYPE_CHECKING:  # matplotlib is optional: only the figures need it
    from matplotlib.figure import Figure


# ---------------------------------------------------------------------------------------
# The suite: every setup, node count and seed, one train.py process each
# ---------------------------------------------------------------------------------------

# the paper's figure 2, SegViz with FedBN, the stronger baselines and the upper bound
SETUPS = (("single", []), ("central", []), ("central", ["--loss", "marginal"]), ("fedavg", []),
          ("fedavg", ["--loss", "marginal"]), ("segviz", []), ("segviz", ["--fedbn"]), ("oracle", []))
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def suite_plan(out: str, nodes: Sequence[int], seeds: Sequence[int], passed: list[str],
               real: bool) -> list[tuple[str, str, list[str]]]:
    """(setup name, its folder, the train.py arguments) of every run of the suite. The user's
    other flags apply to every run; each setup's own flags come after them and win."""
    plan = []
    for n in nodes:
        for mode, extra in SETUPS:
            if (mode == "oracle" and real) or (mode != "single" and n == 1):
                continue
            name = f"{mode}{'-fedbn' if '--fedbn' in extra else ''}{'-marginal' if 'marginal' in extra else ''}-{n}"
            for seed in seeds:
                folder = os.path.join(out, name, f"seed-{seed}") if len(seeds) > 1 else os.path.join(out, name)
                plan.append((name, folder, [*passed, "--nodes", str(n), "--mode", mode, *extra,
                                            "--seeds", str(seed), "--out", folder]))
    return plan


def run_suite(out: str, nodes: Sequence[int], seeds: Sequence[int], passed: list[str]) -> int:
    """Every run of the suite that has not finished, then the comparison."""
    real = any(a == "--data-root" or a.startswith(("--data-root=", "--data")) for a in passed)
    plan = suite_plan(out, nodes, seeds, passed, real)
    device = [a for i, a in enumerate(passed) if a.startswith("--device") or (i and passed[i - 1] == "--device")]
    print(f"suite: {len(plan)} runs under {out}")
    for i, (name, folder, argv) in enumerate(plan, 1):
        seed = argv[argv.index("--seeds") + 1]
        if os.path.exists(os.path.join(folder, "metrics.json")):
            print(f"[{i}/{len(plan)}] {name} seed {seed}: finished, skipped")
            continue
        if os.path.exists(os.path.join(folder, "state.pt")):
            print(f"[{i}/{len(plan)}] {name} seed {seed}: resuming")
            argv = ["--resume", folder, *device]
        else:
            print(f"[{i}/{len(plan)}] {name} seed {seed}")
        result = subprocess.run([sys.executable, TRAIN, *argv], check=False)
        if result.returncode != 0:
            fail(f"suite: {name} seed {seed} stopped (exit {result.returncode}); issue the command again to go on")
    print(compare_runs(out))
    return 0


# ---------------------------------------------------------------------------------------
# Comparing finished runs: tables over seeds, significance
# ---------------------------------------------------------------------------------------


def run_label(m: dict) -> str:
    """A run's name from its metrics: mode, -fedbn, -marginal, -nodes."""
    cfg = m.get("config", {})
    return (f"{m['mode']}{'-fedbn' if cfg.get('fedbn') else ''}"
            f"{'-marginal' if cfg.get('loss') == 'marginal' else ''}-{m['nodes']}")


def read_runs(folder: str) -> dict[str, list[dict]]:
    """Every finished training run under `folder` (DIR/metrics.json, DIR/*/metrics.json or
    DIR/*/*/metrics.json), by setup name, its seeds in order. Each metrics dict gains "dir"."""
    if not os.path.isdir(folder):
        fail(f"{folder}: no such folder")
    runs: dict[str, list[dict]] = {}
    paths = [os.path.join(folder, "metrics.json")]
    for d in sorted(os.listdir(folder)):
        paths.append(os.path.join(folder, d, "metrics.json"))
        if os.path.isdir(os.path.join(folder, d)):
            paths += [os.path.join(folder, d, e, "metrics.json") for e in sorted(os.listdir(os.path.join(folder, d)))]
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                m = json.load(f)
            if "checkpoint" in m:  # a re-evaluation written by eval.py, not a training run
                continue
            runs.setdefault(run_label(m), []).append({**m, "dir": os.path.dirname(path)})
        except (OSError, ValueError, KeyError) as e:
            fail(f"{path}: not a metrics file written by train.py ({e})")
    if not runs:
        fail(f"{folder}: no run folder with a metrics.json")
    return {name: sorted(ms, key=lambda m: m.get("seed", m.get("config", {}).get("seed", 0)))
            for name, ms in runs.items()}


def significance(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank test of paired Dice values; p and the poster's mark
    (** p < 0.01, * p < 0.05, ns otherwise). Identical samples give p = 1."""
    from scipy.stats import wilcoxon

    diff = np.asarray(a, float) - np.asarray(b, float)
    if len(diff) < 2 or np.allclose(diff, 0):
        return 1.0, "ns"
    p = float(wilcoxon(a, b).pvalue)
    return p, "**" if p < 0.01 else "*" if p < 0.05 else "ns"


def run_metrics(m: dict) -> dict[str, dict[str, dict]]:
    """{scoring: {metric: {organ: summary}}} of one run's metrics.json, whichever version wrote it:
    "by_scoring" now, "dice_by_scoring" before surface metrics, else the primary scoring's Dice."""
    if "by_scoring" in m:
        return m["by_scoring"]
    if "dice_by_scoring" in m:
        return {k: {"dice": v} for k, v in m["dice_by_scoring"].items()}
    return {m.get("scoring", "classes"): {metric: m[metric] for metric in METRICS if metric in m}}


def scored_rows(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """One row per setup and scoring: "segviz-4" (its merged label map) and "segviz-4 (heads)",
    "single-4" (each head alone) and "single-4 (merged)"; each row's {metric: {organ: summary}}
    per seed."""
    rows = {}
    for name, seeds in runs.items():
        by = [run_metrics(m) for m in seeds]
        primary = seeds[0].get("scoring", next(iter(by[0])))
        for scoring in sorted(by[0], key=lambda k: k != primary):
            rows[name if scoring == primary else f"{name} ({scoring})"] = [b[scoring] for b in by]
    return rows


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


def compare_runs(folder: str) -> str:
    """results.md and results.json under `folder`: per setup and organ, mean ± std over seeds of
    Dice (each setup against SegViz with the same number of nodes: Wilcoxon over matched (seed,
    test case) pairs), then of HD95 and NSD. results.json: {row: {organ: Dice entry, with its
    "hd95" and "nsd" entries inside}}."""
    runs = read_runs(folder)
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
            if metric != "dice" and not any(d for seeds in per_row.values() for d in seeds):
                continue  # runs evaluated before surface metrics
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
                        mark = compare_to_segviz(entry, per_row[row], ref, organ, row == f"segviz-{nodes}")
                        result[row][organ] = entry
                    elif organ in result[row]:
                        result[row][organ][metric] = entry
                    cells.append(format_cell(entry, METRIC_DIGITS[metric]) + (f" {mark}" if mark else ""))
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
            lines.append("")
    lines.append("Cells: mean ± std over seeds of each seed's mean over the test cases. Marks: each row "
                 "against SegViz (merged) with the same nodes, two-sided Wilcoxon signed-rank test of Dice over "
                 "matched (seed, test case) pairs (** p < 0.01, * p < 0.05, ns not significant). HD95 has no "
                 "value where the prediction or the truth is empty (MONAI's rule): its means are over the "
                 "other cases, and \"(n nan)\" counts the (seed, case) pairs without one.")
    text = "\n".join(lines)
    write_text_atomic(os.path.join(folder, "results.md"), text + "\n")
    write_json_atomic(os.path.join(folder, "results.json"), result)
    return text


def compare_to_segviz(entry: dict, mine: list[dict], ref: list[dict] | None, organ: str, is_ref: bool) -> str:
    """The Wilcoxon mark of a row's Dice against SegViz's (p stored in `entry`); "" if not compared."""
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


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("figures need matplotlib, an optional dependency: pip install matplotlib")
    return plt


def box_plot(runs: dict[str, dict], path: str) -> None:
    """Dice per test case as the poster shows it: one panel per organ (columns) and number of
    nodes (rows), one box per setup."""
    plt = _pyplot()
    organs = [o for o in ORGAN_ID if any(o in ms[0]["dice"] for ms in runs.values())]
    node_counts = sorted({ms[0]["nodes"] for ms in runs.values()})
    fig, axes = plt.subplots(len(node_counts), len(organs), figsize=(3.2 * len(organs), 4.2 * len(node_counts)),
                             squeeze=False)
    for row, nodes in zip(axes, node_counts):
        for ax, organ in zip(row, organs):
            names = [n for n, ms in runs.items() if ms[0]["nodes"] == nodes and organ in ms[0]["dice"]]
            if not names:  # e.g. kidneys with two nodes: no site labelled them
                ax.set_axis_off()
                continue
            # every (seed, test case) Dice of a setup in one box
            ax.boxplot([[v for m in runs[n] for v in m["dice"][organ]["cases"]] for n in names], showmeans=True)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=70, fontsize=7)
            ax.set_title(f"{organ}, {nodes} node(s)" if len(node_counts) > 1 else organ)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(axis="y", alpha=0.3)
        row[0].set_ylabel("Dice per test case")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OVERLAY_COLOURS = {"liver": (0.85, 0.35, 0.2), "spleen": (0.2, 0.5, 0.9), "pancreas": (0.95, 0.8, 0.2),
                   "kidneys": (0.3, 0.8, 0.4)}


def overlays(folder: str, runs: dict[str, dict], out_dir: str, device="cpu") -> list[str]:
    """One axial and one coronal slice per test case (through the organs' centre, in radiological
    convention): the truth and each setup's prediction over the CT. Each run's model is rebuilt
    from its checkpoint."""
    plt = _pyplot()
    first = next(iter(runs.values()))[0]
    test = load_test_set(first["config"], argparse.Namespace(data_root=None, data=[], cache=first["config"].get(
        "cache_dir"), workers=1))
    predictions = {}
    for name in runs:
        ckpt = load_checkpoint(os.path.join(runs[name][0]["dir"], "model.pt"))  # the first seed's model
        model = model_from_checkpoint(ckpt).to(device).eval()
        scoring = primary_scoring(ckpt["mode"])
        roi, overlap, blend = sliding_settings(ckpt["config"])
        predictions[name] = [label_map(predict_masks(model, c, ckpt["organs"], roi, scoring, device, overlap, blend,
                                                     ckpt["config"].get("largest", False))).cpu() for c in test]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for i, case in enumerate(test):
        fig = overlay_figure(case, [("truth", case.label), *((n, predictions[n][i]) for n in runs)])
        path = os.path.join(out_dir, f"overlay_{case.name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def radiological(plane: torch.Tensor) -> torch.Tensor:
    """A slice of a working volume as an image (rows, columns) in radiological convention: the
    patient's right on the image's left; anterior at the top of an axial (x, y) slice, superior
    at the top of a coronal (x, z) one.

    Working volumes are RAS arrays (data.py): x grows towards the patient's RIGHT (the phantom's
    liver lies at high x, its spleen at low x; datasets.to_btcv_ids calls high x the right kidney),
    y towards anterior, z towards superior. imshow draws row 0 at the top and column 0 at the
    left, so both axes are reversed: high x to the left, high y (or z) to the top."""
    return plane.T.flip(0).flip(1)


def overlay_figure(case: Case, panels: Sequence[tuple[str, torch.Tensor]]) -> Figure:
    """One column per (title, label map) over the case's CT: an axial slice above a coronal one,
    both through the organs' centre, in radiological convention with R and L marked."""
    plt = _pyplot()
    fg = torch.nonzero(case.label > 0).float().mean(0).round().long() if (case.label > 0).any() \
        else torch.tensor(case.label.shape) // 2
    sx, sy, sz = case.spacing
    fig, axes = plt.subplots(2, len(panels), figsize=(2.2 * len(panels), 4.6), squeeze=False)
    for j, (title, lab) in enumerate(panels):
        views = ((case.hu[:, :, fg[2]], lab[:, :, fg[2]], sy / sx), (case.hu[:, fg[1], :], lab[:, fg[1], :], sz / sx))
        for row, (img, seg, aspect) in enumerate(views):
            ax = axes[row][j]
            ax.imshow(window(radiological(img), (-175.0, 250.0)).numpy(), cmap="gray", vmin=0, vmax=1, aspect=aspect)
            shown = radiological(seg).numpy()
            rgba = np.zeros((*shown.shape, 4))
            for organ, colour in OVERLAY_COLOURS.items():
                rgba[shown == ORGAN_ID[organ]] = (*colour, 0.45)
            ax.imshow(rgba, aspect=aspect)
            for x, letter, align in ((0.03, "R", "left"), (0.97, "L", "right")):
                ax.text(x, 0.5, letter, transform=ax.transAxes, ha=align, va="center", color="yellow",
                        fontsize=7, fontweight="bold")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def validation_curves(runs: dict[str, dict], out_dir: str) -> list[str]:
    """Validation Dice per round of each site, one figure per run trained with --val-every."""
    plt = _pyplot()
    written = []
    for name, ms in runs.items():
        m = ms[0]
        rows = m.get("validation") or []
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.4))
        rounds = [r["round"] for r in rows]
        for site in (k for k in rows[0] if k != "round"):
            ax.plot(rounds, [r[site] for r in rows], marker="o", ms=3, label=site,
                    color=OVERLAY_COLOURS.get(site))
        ax.set_xlabel("round")
        ax.set_ylabel("validation Dice (own site)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"validation_{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


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



# ---------------------------------------------------------------------------------------
# Choosing defaults on validation
# ---------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def validation_table(folders: list[str]) -> str:
    """Per candidate: each site's last validation Dice and their mean, mean ± std over seeds."""
    lines = []
    for folder in folders:
        for name, seeds in read_runs(folder).items():
            last = [m["validation"][-1] for m in seeds if m.get("validation")]
            if not last:
                continue
            sites = [k for k in last[0] if k != "round"]
            if not lines:
                lines = ["| candidate | seeds | " + " | ".join(sites) + " | mean |",
                         "|---|---|" + "---|" * (len(sites) + 1)]
            cells = [mean_std([r[s] for r in last]) for s in sites]
            cells.append(mean_std([float(np.mean([r[s] for s in sites])) for r in last]))
            lines.append(f"| {folder} ({name}) | {len(last)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def site_models(ckpt: dict) -> dict[str, torch.nn.Module]:
    """The model each site holds: its own binary model, or the one multi-class model."""
    cfg = ckpt["config"]
    net_cfg = UNetConfig.from_dict(cfg["unet"])
    if ckpt["mode"] in ("single", "segviz"):
        return {s: MetaModel(net_cfg, {s: state}, {s: cfg["windows"][s]}, False) for s, state in ckpt["states"].items()}
    return {s: MultiClassModel(net_cfg, ckpt["states"]["global"], cfg["windows"][s]) for s in ckpt["organs"]}


def validation_cases(cfg: dict) -> dict[str, list]:
    from phantom import PhantomSpec, phantom_validation

    if cfg["data"]["source"] != "phantom":
        raise SystemExit("eval-options: phantom runs only (real data: pass the validation folders to eval.py)")
    spec = PhantomSpec(cases=cfg["phantom_cases"], spacing=tuple(cfg["spacing"]))
    return phantom_validation(NODE_SITES[cfg["nodes"]], 4, seed=cfg["seed"], spec=spec, cache_dir=cfg["cache_dir"])


OPTIONS = [("gaussian", True), ("gaussian", False), ("constant", True), ("constant", False)]


def eval_options_table(folders: list[str]) -> str:
    """Mean validation Dice over sites under each (blending, clean-up), mean ± std over seeds."""
    lines = ["| candidate | " + " | ".join(f"{b}{', largest' if k else ''}" for b, k in OPTIONS) + " |",
             "|---|" + "---|" * len(OPTIONS)]
    for folder in folders:
        for name, seeds in read_runs(folder).items():
            per_option: dict[tuple, list[float]] = {o: [] for o in OPTIONS}
            for m in seeds:
                ckpt = load_checkpoint(f"{m['dir']}/model.pt")
                cfg = ckpt["config"]
                cases = validation_cases(cfg)
                models = site_models(ckpt)
                for option in OPTIONS:
                    site_means = []
                    for site, model in models.items():
                        scored = evaluate(model, cases[site], [site], cfg["roi"], "cpu", cfg["eval_overlap"],
                                          option[0], option[1], surface=False)
                        scoring = "heads" if "heads" in scored else "classes"
                        site_means.append(float(np.mean(scored[scoring]["dice"][site])))
                    per_option[option].append(float(np.mean(site_means)))
            lines.append(f"| {folder} ({name}) | " + " | ".join(mean_std(per_option[o]) for o in OPTIONS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("suite", help="every setup for every node count and seed (train.py runs), then compare; "
                                     "other flags go to train.py")
    s.add_argument("--out", default=os.path.join("runs", "paper"), help="folder of the runs (default runs/paper)")
    s.add_argument("--nodes", type=int, nargs="+", default=[2, 3, 4], choices=(1, 2, 3, 4),
                   help="node counts (default 2 3 4)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    c = sub.add_parser("compare", help="DIR/results.md and results.json: every setup over seeds, with Wilcoxon "
                                       "tests against SegViz, then its HD95 and NSD")
    c.add_argument("folder", metavar="DIR")
    c.add_argument("--figures", action="store_true",
                   help="also DIR/figures/dice_boxplot.png (a row per number of nodes), one overlay per test case "
                        "of the setups with the most nodes, and validation curves of runs trained with "
                        "--val-every (needs matplotlib; re-runs those models on the test set)")
    c.add_argument("--device", default="auto", help="for --figures: auto, cpu, cuda[:N] or mps")
    t = sub.add_parser("table", help="one row per finished run (and seed) under DIR, with its wall time")
    t.add_argument("folder", metavar="DIR")
    v = sub.add_parser("validation", help="each candidate's validation Dice, mean ± std over seeds")
    v.add_argument("folders", nargs="+")
    e = sub.add_parser("eval-options", help="blending and clean-up scored on the validation cases")
    e.add_argument("folders", nargs="+")
    args, passed = p.parse_known_args(argv)
    if passed and args.what != "suite":
        p.error(f"unrecognized arguments: {' '.join(passed)}")
    if args.what == "suite":
        if {"--mode", "--fedbn", "--resume"} & {a.split("=")[0] for a in passed}:
            p.error("suite: --mode, --fedbn and --resume are the suite's own (it resumes by itself)")
        check_writable(args.out, "--out")
        return run_suite(args.out, sorted(set(args.nodes)), args.seeds, passed)
    if args.what == "table":
        print(table_of_runs(args.folder))
    elif args.what == "compare":
        check_writable(args.folder, "DIR")
        print(compare_runs(args.folder))
        if args.figures:
            print(figures(args.folder, resolve_device(args.device, p)))
    elif args.what == "validation":
        print(validation_table(args.folders))
    else:
        print(eval_options_table(args.folders))
    return 0


def figures(folder: str, device: torch.device) -> str:
    """The box plot, overlays of the largest federation's setups, and validation curves."""
    runs = read_runs(folder)
    fig_dir = os.path.join(folder, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    box_plot(runs, os.path.join(fig_dir, "dice_boxplot.png"))
    # overlays of the largest federation only: one panel per setup stays readable
    most = max(ms[0]["nodes"] for ms in runs.values())
    shown = {n: ms for n, ms in runs.items() if ms[0]["nodes"] == most}
    written = overlays(folder, shown, fig_dir, device)
    curves = validation_curves(runs, fig_dir)
    return f"figures: {fig_dir}/dice_boxplot.png, {len(written)} overlay(s), {len(curves)} validation curve(s)"


if __name__ == "__main__":
    sys.exit(main())
