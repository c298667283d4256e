"""Figures of compared runs (`python -m experiments compare DIR --figures`): Dice, HD95 and NSD
per test case as box plots, each site's training loss per round, overlays of each setup's
prediction through each organ in radiological convention, and validation curves. matplotlib is
optional and imported only here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from cases import load_test_set
from checkpoint import MODEL_FILE, config_of, model_of, read_checkpoint
from common import fail
from data import ORGAN_COLOURS, ORGAN_ID, Case, window
from eval import label_map, segment
from experiments.compare import read_runs, scored_rows
from metrics import NSD_TOLERANCE_MM
from segviz import MODES

if TYPE_CHECKING:  # matplotlib is optional: only the figures need it
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("figures need matplotlib, an optional dependency: pip install matplotlib")
    return plt


METRIC_AXES = {  # what each metric's box plot shows on its y axis, and its range
    "dice": ("Dice per test case", (-0.02, 1.02)),
    "hd95": ("HD95 per test case (mm)", None),
    "nsd": (f"NSD per test case ({NSD_TOLERANCE_MM:g} mm)", (-0.02, 1.02)),
}


def box_plot(runs: dict[str, list[dict]], path: str, metric: str = "dice") -> None:
    """One metric per test case as the poster shows Dice: one panel per organ (columns) and
    number of nodes (rows), one box per row of the tables (a binary model's merged map and its
    heads alone apart), every (seed, test case) value in it. HD95 leaves out the cases it has
    no value for (an empty mask), as the tables do."""
    plt = pyplot()
    rows = scored_rows(runs)
    organs = [o for o in ORGAN_ID if any(o in ms[0]["scores"]["dice"] for ms in rows.values())]
    node_counts = sorted({ms[0]["nodes"] for ms in rows.values()})
    label, limits = METRIC_AXES[metric]
    fig, axes = plt.subplots(
        len(node_counts),
        len(organs),
        figsize=(3.4 * len(organs), 4.6 * len(node_counts)),
        squeeze=False,
    )
    for panels, nodes in zip(axes, node_counts):
        for ax, organ in zip(panels, organs):
            names = [n for n, ms in rows.items()
                     if ms[0]["nodes"] == nodes and organ in ms[0]["scores"][metric]]
            if not names:  # e.g. kidneys with two nodes: no site labelled them
                ax.set_axis_off()
                continue
            values = [[v for m in rows[n] for v in m["scores"][metric][organ]["cases"]
                       if v is not None and np.isfinite(v)] for n in names]
            ax.boxplot(values, showmeans=True)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=70, fontsize=7)
            ax.set_title(f"{organ}, {nodes} node(s)" if len(node_counts) > 1 else organ)
            if limits:
                ax.set_ylim(*limits)
            ax.grid(axis="y", alpha=0.3)
        panels[0].set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curves(runs: dict[str, list[dict]], path: str) -> None:
    """Each site's training loss per round (its mean over the round's local steps), one panel per
    setup: the mean over seeds as a line, the seeds' range shaded. A pooled model has one."""
    plt = pyplot()
    names = [n for n, ms in runs.items() if any(ms[0].get("losses", {}).values())]
    columns = min(4, len(names))
    lines = -(-len(names) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.6 * columns, 2.9 * lines),
                             squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        for site in runs[name][0]["losses"]:
            curves = [m["losses"][site] for m in runs[name] if m["losses"].get(site)]
            span = min(len(c) for c in curves)
            values = np.array([c[:span] for c in curves])
            rounds = np.arange(1, span + 1)
            colour = ORGAN_COLOURS.get(site, (0.3, 0.3, 0.3))
            ax.plot(rounds, values.mean(0), color=colour, label=site, lw=1.2)
            ax.fill_between(rounds, values.min(0), values.max(0), color=colour, alpha=0.2, lw=0)
        seeds = len(runs[name])
        ax.set_title(f"{name} ({seeds} seed{'s' if seeds > 1 else ''})", fontsize=8)
        ax.set_xlabel("round", fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlays(
    folder: str, runs: dict[str, list[dict]], out_dir: str, device: torch.device | str = "cpu"
) -> list[str]:
    """One axial and one coronal slice per test case (through the organs' centre, in radiological
    convention): the truth and each setup's prediction over the CT. Each run's model is rebuilt
    from its checkpoint."""
    plt = pyplot()
    test = None
    predictions = {}
    for name in runs:
        # the first seed's model
        ckpt = read_checkpoint(os.path.join(runs[name][0]["dir"], MODEL_FILE))
        cfg = config_of(ckpt, device=str(device))
        test = test or load_test_set(cfg)
        model = model_of(ckpt).to(device).eval()
        scoring = MODES[ckpt["mode"]].scorings[0]
        predictions[name] = [
            label_map(segment(model, c, ckpt["organs"], (scoring,), cfg)[scoring]).cpu()
            for c in test
        ]
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
    liver lies at high x, its spleen at low x; predict.to_btcv_ids calls high x the right kidney),
    y towards anterior, z towards superior. imshow draws row 0 at the top and column 0 at the
    left, so both axes are reversed: high x to the left, high y (or z) to the top."""
    return plane.T.flip(0).flip(1)


def overlay_figure(case: Case, panels: Sequence[tuple[str, torch.Tensor]]) -> Figure:
    """One column per (title, label map) over the case's CT, in radiological convention with R
    and L marked: an axial slice through the centre of each organ the truth holds (one row per
    organ, named on the left), then a coronal slice through all of them; the organs' colours in
    a legend below."""
    plt = pyplot()
    from matplotlib.patches import Patch

    truth = case.label
    present = [o for o in ORGAN_ID if (truth == ORGAN_ID[o]).any()]
    sx, sy, sz = case.spacing
    rows = [(organ, "axial", centre(truth == ORGAN_ID[organ])) for organ in present]
    rows.append(("all organs", "coronal", centre(truth > 0)))
    fig, axes = plt.subplots(len(rows), len(panels),
                             figsize=(2.2 * len(panels), 1.9 * len(rows) + 0.4), squeeze=False)
    for i, (what, view, at) in enumerate(rows):
        for j, (title, lab) in enumerate(panels):
            if view == "axial":
                img, seg, aspect = case.hu[:, :, at[2]], lab[:, :, at[2]], sy / sx
            else:
                img, seg, aspect = case.hu[:, at[1], :], lab[:, at[1], :], sz / sx
            ax = axes[i][j]
            ax.imshow(window(radiological(img), (-175.0, 250.0)).numpy(), cmap="gray", vmin=0,
                      vmax=1, aspect=aspect)
            shown = radiological(seg).numpy()
            rgba = np.zeros((*shown.shape, 4))
            for organ, colour in ORGAN_COLOURS.items():
                rgba[shown == ORGAN_ID[organ]] = (*colour, 0.45)
            ax.imshow(rgba, aspect=aspect)
            for x, letter, align in ((0.03, "R", "left"), (0.97, "L", "right")):
                ax.text(x, 0.5, letter, transform=ax.transAxes, ha=align, va="center",
                        color="yellow", fontsize=7, fontweight="bold")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j == 0:
                ax.set_ylabel(f"{what}\n({view})", fontsize=7)
    legend = [Patch(color=ORGAN_COLOURS[o], alpha=0.6, label=o) for o in ORGAN_COLOURS]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def centre(mask: torch.Tensor) -> torch.Tensor:
    """The voxel at a mask's centre of mass (the volume's centre for an empty mask)."""
    if not mask.any():
        return torch.tensor(mask.shape) // 2
    return torch.nonzero(mask).float().mean(0).round().long()


def validation_curves(runs: dict[str, list[dict]], out_dir: str) -> list[str]:
    """Validation Dice per round of each site, one figure per run trained with --val-every."""
    plt = pyplot()
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
                    color=ORGAN_COLOURS.get(site))
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


def figures(folder: str, device: torch.device) -> str:
    """Box plots of Dice, HD95 and NSD, the training loss curves, overlays of the largest
    federation's setups, and validation curves."""
    runs = read_runs(folder)
    fig_dir = os.path.join(folder, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    for metric in METRIC_AXES:
        box_plot(runs, os.path.join(fig_dir, f"{metric}_boxplot.png"), metric)
    loss_curves(runs, os.path.join(fig_dir, "loss_curves.png"))
    # overlays of the largest federation only: one panel per setup stays readable
    most = max(ms[0]["nodes"] for ms in runs.values())
    shown = {n: ms for n, ms in runs.items() if ms[0]["nodes"] == most}
    written = overlays(folder, shown, fig_dir, device)
    curves = validation_curves(runs, fig_dir)
    return (f"figures in {fig_dir}: {', '.join(f'{m}_boxplot.png' for m in METRIC_AXES)}, "
            f"loss_curves.png, {len(written)} overlay(s), {len(curves)} validation curve(s)")
