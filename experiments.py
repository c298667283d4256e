"""Experiments around SegViz: comparing setups, figures, and choosing defaults on validation.

    python experiments.py suite --out DIR [--nodes 2 3 4] [--seeds 0 1 2] [train.py flags]
    python experiments.py train [train.py flags] [--marginal | --oracle | robustness flags]
    python experiments.py compare DIR [--figures]    # results.md/json: every setup over seeds, Wilcoxon marks
    python experiments.py table DIR                  # one row per finished run (and seed)
    python experiments.py validation DIR [DIR ...]   # each candidate's validation Dice over seeds
    python experiments.py eval-options DIR [DIR ...] [--cases N]  # blending and clean-up, on validation

`train` is train.py with a variant that is not SegViz itself, passed into `training.train` as
functions: the marginal loss (central, fedavg), the oracle (central with every organ labelled,
phantom only), weighted or robust aggregation, screening updates, absent clients and DP.
`suite` trains the paper's figure 2 (single, central, fedavg, segviz), SegViz with FedBN, the
central and FedAvg models with the marginal loss, and the oracle (phantom only), for every node
count and seed, each as its own `train.py` (or `experiments.py train`) process writing
DIR/<setup>[/seed-S]; a finished run is skipped and an unfinished one resumed, so the command
can simply be issued again; then it compares them. `compare` reads every finished run under
DIR (DIR/<setup>/metrics.json or DIR/<setup>/seed-S/metrics.json, as `suite` writes them). A candidate for
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
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import torch

from common import check_writable, fail, resolve_device, write_json_atomic, write_text_atomic
from data import NODE_SITES, ORGANS, DataConfig, DataError, load_validation
from eval import (
    METRIC_DIGITS,
    METRIC_TITLES,
    METRICS,
    across_seeds,
    case_scores,
    cases_source,
    checkpoint_cache,
    clean_masks,
    format_cell,
    format_table,
    load_checkpoint,
    organ_masks,
    predict_scores,
    scorings,
)
from segviz import BINARY, site_model
from unet3d import UNetConfig

# ---------------------------------------------------------------------------------------
# The suite: every setup, node count and seed, one train.py process each
# ---------------------------------------------------------------------------------------

# the paper's figure 2, SegViz with FedBN, the stronger baselines and the upper bound: (name stem,
# the flags of its run); the last three are variants that `experiments.py train` runs
SETUPS = (("single", ["--mode", "single"]), ("central", ["--mode", "central"]),
          ("central-marginal", ["--mode", "central", "--marginal"]), ("fedavg", ["--mode", "fedavg"]),
          ("fedavg-marginal", ["--mode", "fedavg", "--marginal"]), ("segviz", ["--mode", "segviz"]),
          ("segviz-fedbn", ["--mode", "segviz", "--fedbn"]), ("oracle", ["--mode", "central", "--oracle"]))
HERE = os.path.dirname(os.path.abspath(__file__))
VARIANT_FLAGS = ("--marginal", "--oracle")


def script_of(flags: Sequence[str]) -> list[str]:
    """The command that trains a setup: train.py, or experiments.py train for a variant."""
    if any(f in VARIANT_FLAGS for f in flags):
        return [sys.executable, os.path.join(HERE, "experiments.py"), "train"]
    return [sys.executable, os.path.join(HERE, "train.py")]


def suite_plan(out: str, nodes: Sequence[int], seeds: Sequence[int], passed: list[str],
               real: bool) -> list[tuple[str, str, list[str]]]:
    """(setup name, its folder, its flags) of every run of the suite. The user's other flags
    apply to every run; each setup's own flags come after them."""
    plan = []
    for n in nodes:
        for stem, flags in SETUPS:
            if (stem == "oracle" and real) or (stem != "single" and n == 1):
                continue
            for seed in seeds:
                folder = os.path.join(out, f"{stem}-{n}", f"seed-{seed}") if len(seeds) > 1 else \
                    os.path.join(out, f"{stem}-{n}")
                plan.append((f"{stem}-{n}", folder, [*passed, "--nodes", str(n), *flags, "--seeds", str(seed),
                                                     "--out", folder]))
    return plan


def run_suite(out: str, nodes: Sequence[int], seeds: Sequence[int], passed: list[str]) -> int:
    """Every run of the suite that has not finished, then the comparison."""
    real = any(a == "--data-root" or a.startswith(("--data-root=", "--data")) for a in passed)
    plan = suite_plan(out, nodes, seeds, passed, real)
    device = [a for i, a in enumerate(passed) if a.startswith("--device") or (i and passed[i - 1] == "--device")]
    print(f"suite: {len(plan)} runs under {out}")
    for i, (name, folder, argv) in enumerate(plan, 1):
        seed = argv[argv.index("--seeds") + 1]
        command = script_of(argv)
        if os.path.exists(os.path.join(folder, "metrics.json")):
            print(f"[{i}/{len(plan)}] {name} seed {seed}: finished, skipped")
            continue
        if os.path.exists(os.path.join(folder, "state.pt")):
            print(f"[{i}/{len(plan)}] {name} seed {seed}: resuming")
            argv = ["--resume", folder, *device]
        else:
            print(f"[{i}/{len(plan)}] {name} seed {seed}")
        result = subprocess.run([*command, *argv], check=False)
        if result.returncode != 0:
            fail(f"suite: {name} seed {seed} stopped (exit {result.returncode}); issue the command again to go on")
    print(compare_runs(out))
    return 0


# ---------------------------------------------------------------------------------------
# Comparing finished runs: tables over seeds, significance
# ---------------------------------------------------------------------------------------


def run_label(m: dict) -> str:
    """A run's name from its metrics (older runs: mode, -fedbn, -marginal, -nodes)."""
    if "name" in m:
        return m["name"]
    cfg = m.get("config", {})
    return (f"{m['mode']}{'-fedbn' if cfg.get('fedbn') else ''}"
            f"{'-marginal' if cfg.get('loss') == 'marginal' else ''}-{m['nodes']}")


TEST_KEYS = (*METRICS, "by_scoring", "scoring", "nsd_tolerance_mm")  # eval.scored_metrics's keys


def read_runs(folder: str) -> dict[str, list[dict]]:
    """Every finished training run under `folder` (DIR/metrics.json, DIR/*/metrics.json or
    DIR/*/*/metrics.json), by setup name, its seeds in order. Each metrics dict gains "dir". A run
    trained with --no-test gains the test scores `eval.py --checkpoint` wrote into its eval/
    folder, if any (the way to read the test set once, after choosing on validation)."""
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
            later = os.path.join(os.path.dirname(path), "eval", "metrics.json")
            if not m.get("dice") and os.path.isfile(later):  # trained with --no-test, scored later
                with open(later) as f:
                    m = {**m, **{k: v for k, v in json.load(f).items() if k in TEST_KEYS}}
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


def compare_runs(folder: str) -> str:
    """results.md and results.json under `folder`: per setup and organ, mean ± std over seeds of
    Dice (each setup against SegViz with the same number of nodes: Wilcoxon over matched (seed,
    test case) pairs), then of HD95 and NSD. results.json: {row: {organ: Dice entry, with its
    "hd95" and "nsd" entries inside}}."""
    runs = {name: scored for name, ms in read_runs(folder).items() if (scored := [m for m in ms if m.get("dice")])}
    if not runs:
        fail(f"{folder}: no run with test scores (train.py's, or eval.py's in a --no-test run's eval/ folder)")
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
    cfg, mode = ckpt["config"], ckpt["mode"]
    net_cfg = UNetConfig.from_dict(cfg["unet"])
    return {s: site_model(net_cfg, mode, s, ckpt["states"][s if mode in BINARY else "global"], cfg["windows"][s])
            for s in ckpt["organs"]}


def validation_cases(cfg: dict, n: int | None = None) -> dict[str, list]:
    """The validation cases a run validated on, as training.py loads them (real data: from the
    folders it trained on, which must still be there). On the phantom, `n` draws n a site instead
    (the first 4 are training's): more cases, a steadier comparison."""
    source = cases_source(cfg)
    real = source.get("source") == "real"
    if n and real:
        fail("eval-options: --cases: real data's validation cases are its held-out split")
    if real and not any(source.get("validation", {}).values()):
        fail("eval-options: this run held out no validation cases; train with --val-every or --val-split F")
    # checkpoints before the Config dataclass kept the source under "data"; their paths are its roots
    overrides = (cfg.get("data") or {}) if "source" in cfg else {}
    paths = tuple(sorted(overrides.items())) if real else ()
    dc = DataConfig(checkpoint_cache(cfg), tuple(cfg["spacing"]), cfg.get("max_cases"),
                    cfg.get("data_root") if real else None, paths, cfg.get("val_split", "auto"))
    try:
        cases = load_validation(NODE_SITES[cfg["nodes"]], dc, cfg["seed"], n)
    except DataError as e:
        fail(f"eval-options: {e}")
    if real and {s: sorted(c.name for c in cs) for s, cs in cases.items() if cs} != \
            {s: sorted(names) for s, names in source.get("validation", {}).items() if names}:
        fail("eval-options: the data folders no longer hold the validation cases this run held out")
    return cases


OPTIONS = [("gaussian", True), ("gaussian", False), ("constant", True), ("constant", False)]


def options_dice(model: torch.nn.Module, cases: Sequence, site: str, roi: Sequence[int], overlap: float
                 ) -> dict[tuple[str, bool], float]:
    """One site's mean Dice on its cases under each test-time option, as `evaluate` scores them:
    one inference per case and blending, both clean-ups read from it."""
    model = model.to("cpu").eval()
    kind = "heads" if "heads" in scorings(model) else "classes"
    dice: dict[tuple[str, bool], list[float]] = {o: [] for o in OPTIONS}
    for case in cases:
        for blend in dict.fromkeys(b for b, _ in OPTIONS):
            scores = predict_scores(model, case, roi, "cpu", overlap, blend)
            for largest in (c for b, c in OPTIONS if b == blend):
                masks = clean_masks(organ_masks(scores, [site], kind), largest)
                dice[(blend, largest)] += case_scores(masks, case.label, [site], kind, case.spacing, False)["dice"]
    return {o: float(np.mean(v)) for o, v in dice.items()}


def eval_options_table(folders: list[str], n: int | None = None) -> str:
    """Per candidate and test-time option (blending, clean-up): each site's validation Dice and
    their mean, mean ± std over seeds."""
    lines = ["| candidate | blending | clean-up | " + " | ".join(ORGANS) + " | mean over sites |",
             "|---|---|---|" + "---|" * (len(ORGANS) + 1)]
    for folder in folders:
        for name, seeds in read_runs(folder).items():
            dice: dict[tuple, dict[str, list[float]]] = {o: {} for o in OPTIONS}  # option -> site -> per seed
            for m in seeds:
                ckpt = load_checkpoint(f"{m['dir']}/model.pt")
                cfg = ckpt["config"]
                cases = validation_cases(cfg, n)
                for site, model in site_models(ckpt).items():
                    for option, value in options_dice(model, cases[site], site, cfg["roi"],
                                                      cfg["eval_overlap"]).items():
                        dice[option].setdefault(site, []).append(value)
            for (blend, largest), per_site in dice.items():
                cells = [mean_std(per_site[o]) if o in per_site else "–" for o in ORGANS]
                site_means = np.mean([per_site[s] for s in per_site], axis=0)
                lines.append(f"| {folder} ({name}) | {blend} | {'largest' if largest else 'none'} | "
                             + " | ".join(cells) + f" | {mean_std(list(site_means))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from variants import main as train_main

        return train_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("train", help="one run of train.py with a variant: --marginal, --oracle, --weighted, robust "
                                 "aggregation, absent clients, DP (see experiments.py train -h)")
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
    e.add_argument("--cases", type=int, metavar="N",
                   help="phantom runs: score on N validation cases a site (training's 4 and more)")
    args, passed = p.parse_known_args(argv)
    if passed and args.what != "suite":
        p.error(f"unrecognized arguments: {' '.join(passed)}")
    if getattr(args, "cases", None) is not None and args.cases < 1:
        p.error(f"eval-options: --cases {args.cases}: needs at least 1 case a site")
    if args.what == "suite":
        given = {a.split("=")[0] for a in passed}
        if {"--mode", "--fedbn", "--resume"} & given:
            p.error("suite: --mode, --fedbn and --resume are the suite's own (it resumes by itself)")
        from variants import VARIANT_KEYS

        if variants := sorted(given & {"--" + k.replace("_", "-") for k in VARIANT_KEYS}):
            p.error(f"suite: {', '.join(variants)}: the suite runs the paper's setups; a variant is "
                    f"python experiments.py train")
        check_writable(args.out, "--out")
        return run_suite(args.out, sorted(set(args.nodes)), args.seeds, passed)
    if args.what == "table":
        print(table_of_runs(args.folder))
    elif args.what == "compare":
        check_writable(args.folder, "DIR")
        print(compare_runs(args.folder))
        if args.figures:
            from figures import figures

            print(figures(args.folder, resolve_device(args.device, p)))
    elif args.what == "validation":
        print(validation_table(args.folders))
    else:
        print(eval_options_table(args.folders, args.cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
