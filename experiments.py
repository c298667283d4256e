"""Experiments around SegViz: comparing setups, figures, and choosing defaults on validation.

    python experiments.py suite --out DIR [--nodes 2 3 4] [--seeds 0 1 2] [train.py flags]
    python experiments.py train [train.py flags] [--marginal | --oracle | robustness flags]
    python experiments.py compare DIR [--figures]    # results.md/json: every setup over seeds, Wilcoxon marks
    python experiments.py table DIR                  # one row per finished run (and seed)
    python experiments.py validation DIR [DIR ...]   # each candidate's validation Dice over seeds
    python experiments.py eval-options DIR [DIR ...] # blending and clean-up, scored on validation

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
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

import robust
from common import check_writable, fail, resolve_device, write_json_atomic, write_text_atomic
from config import Config, add_config_arguments, config_of, resumed_config
from data import NODE_SITES, ORGAN_ID, Case, window
from eval import (
    METRIC_DIGITS,
    METRIC_TITLES,
    METRICS,
    across_seeds,
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
from training import STATE_FILE, Extensions, Loss, load_state, seed_for, soft_dice, train_seeds
from unet3d import UNetConfig

if TYPE_CHECKING:  # matplotlib is optional: only the figures need it
    from matplotlib.figure import Figure


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
# Variants of a training run that are not SegViz itself, passed into training.train
# ---------------------------------------------------------------------------------------


def marginal_loss(logits: torch.Tensor, target: torch.Tensor, labelled: Sequence[int]) -> torch.Tensor:
    """Dice + cross-entropy over background and the `labelled` classes only, with the
    probabilities of every class the site did not label merged into background (Shi et al.
    2021, "marginal loss"): an unlabelled organ is not taught as background, only as "not one
    of the organs this site labelled"."""
    others = [c for c in range(1, logits.shape[1]) if c not in labelled]
    logp = torch.log_softmax(logits, dim=1)
    merged = torch.cat([torch.logsumexp(logp[:, [0, *others]], dim=1, keepdim=True), logp[:, list(labelled)]], 1)
    index = torch.zeros(logits.shape[1], dtype=torch.long, device=target.device)
    index[list(labelled)] = torch.arange(1, len(labelled) + 1, device=target.device)
    t = index[target]
    return soft_dice(merged.exp(), t) + F.nll_loss(merged, t)


def marginal_for(cfg: Config, sites: Sequence[str], which: Callable[[], int]) -> Loss:
    """The marginal loss of a client whose batches come from `sites`; `which()` tells which of
    them gave the batch just drawn (the pooled model draws from each site in turn)."""
    per_site = [functools.partial(marginal_loss, labelled=[ORGAN_ID[s]]) for s in sites]
    return lambda logits, target: per_site[which()](logits, target)


def add_variant_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("variants (experiments.py train only)")
    g.add_argument("--marginal", action="store_true",
                   help="central, fedavg: the marginal loss (unlabelled organs merged into background, not taught "
                        "as it; Shi et al. 2021) instead of the plain one")
    g.add_argument("--oracle", action="store_true",
                   help="central on the phantom with every organ labelled at every site: an upper bound")
    g.add_argument("--weighted", action="store_true", help="weight the average by each site's number of cases")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="each round each client is absent with this probability (seeded; default 0)")
    g.add_argument("--aggregate", default="mean", choices=tuple(robust.AGGREGATORS),
                   help="how shared weights are combined: mean (default), coordinate-wise median, trimmed-mean")
    g.add_argument("--max-update-norm", type=float,
                   help="refuse a client's update (its shared weights minus last round's) above this L2 norm")
    g.add_argument("--norm-factor", type=float,
                   help="refuse a client's update above this multiple of the other clients' median update norm")
    g.add_argument("--dp-clip", type=float, help="differential privacy: clip each client's update to this L2 norm")
    g.add_argument("--dp-noise", type=float, default=0.0,
                   help="differential privacy: Gaussian noise of std DP_NOISE x DP_CLIP on the aggregated update")


VARIANT_KEYS = ("marginal", "oracle", "weighted", "dropout", "aggregate", "max_update_norm", "norm_factor",
                "dp_clip", "dp_noise")


def variant_settings(a: argparse.Namespace, cfg: Config, p: argparse.ArgumentParser) -> dict:
    """The variant flags that differ from their defaults, checked against the config."""
    checks = [
        (a.marginal and cfg.mode not in ("central", "fedavg"), "--marginal applies to --mode central and fedavg"),
        (a.oracle and (cfg.mode != "central" or bool(cfg.data_root or cfg.data)),
         "--oracle needs --mode central and the phantom (every organ labelled at every site)"),
        (not 0 <= a.dropout < 1, "--dropout must be in [0, 1)"),
        (a.dropout and cfg.mode == "central", "--dropout applies to federated modes (central has one client)"),
        (a.max_update_norm is not None and a.max_update_norm <= 0, "--max-update-norm must be positive"),
        (a.norm_factor is not None and a.norm_factor <= 0, "--norm-factor must be positive"),
        (a.dp_clip is not None and a.dp_clip <= 0, "--dp-clip must be positive"),
        (a.dp_noise < 0 or (a.dp_noise and a.dp_clip is None), "--dp-noise needs --dp-clip and must be >= 0"),
    ]
    for bad, why in checks:
        if bad:
            p.error(why)
    defaults = {"marginal": False, "oracle": False, "weighted": False, "dropout": 0.0, "aggregate": "mean",
                "max_update_norm": None, "norm_factor": None, "dp_clip": None, "dp_noise": 0.0}
    return {k: getattr(a, k) for k in VARIANT_KEYS if getattr(a, k) != defaults[k]}


def variant_name(cfg: Config, v: dict) -> str:
    """The stem of a variant's run name: oracle, <mode>-marginal, or the mode."""
    return "oracle" if v.get("oracle") else f"{cfg.mode}-marginal" if v.get("marginal") else ""


def extensions(cfg: Config, v: dict) -> Extensions:
    """The functions a variant passes into training.train, with its random state seeded from the run's."""
    ext = Extensions(name=variant_name(cfg, v), settings=dict(v), full_labels=bool(v.get("oracle")),
                     weighted=bool(v.get("weighted")), loss=marginal_for if v.get("marginal") else None)
    guard = None
    if v.get("max_update_norm") is not None or v.get("norm_factor") is not None:
        guard = robust.Guard(v.get("max_update_norm"), v.get("norm_factor"))
    privacy = None
    if v.get("dp_clip") is not None:
        ext.generators["dp"] = torch.Generator().manual_seed(seed_for(cfg.seed, "dp"))
        privacy = robust.Privacy(v["dp_clip"], v.get("dp_noise", 0.0), ext.generators["dp"])
    if guard or privacy or v.get("aggregate", "mean") != "mean":
        ext.combine = robust.combiner(robust.AGGREGATORS[v.get("aggregate", "mean")], guard, privacy)
    if v.get("dropout"):
        rng = ext.generators["dropout"] = torch.Generator().manual_seed(seed_for(cfg.seed, "dropout"))
        ext.present = lambda clients: robust.present(clients, v["dropout"], rng)
    return ext


def train_main(argv: list[str]) -> int:
    """python experiments.py train [train.py flags] [variant flags]: one run with a variant."""
    p = argparse.ArgumentParser(prog="experiments.py train",
                                description="train.py with a variant that is not SegViz itself (marginal loss, "
                                            "oracle, weighted or robust aggregation, absent clients, DP)")
    add_config_arguments(p)
    add_variant_arguments(p)
    p.add_argument("--resume", metavar="OUT", help="continue the run whose state OUT/state.pt holds "
                                                   "(--device and a larger --rounds may be given)")
    a = p.parse_args(argv)
    if a.resume:
        state = load_state(os.path.join(a.resume, STATE_FILE))
        cfg = resumed_config(state["config"], a.resume, argv, a, p)
        return train_seeds(cfg, [cfg.seed], True, lambda c: extensions(c, state["extensions"]))
    probe = config_of(a, p, check_out=False)
    v = variant_settings(a, probe, p)
    cfg = config_of(a, p, variant_name(probe, v))
    return train_seeds(cfg, a.seeds, ext_for=lambda c: extensions(c, v))


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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
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
