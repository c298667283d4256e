"""Figures of compared runs (`python -m experiments compare DIR --figures`): Dice per test case
as box plots, overlays of each setup's prediction on a test case in radiological convention,
and validation curves. matplotlib is optional and imported only here.
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
from data import ORGAN_ID, Case, window
from eval import label_map, segment
from experiments.compare import read_runs
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


def box_plot(runs: dict[str, list[dict]], path: str) -> None:
    """Dice per test case as the poster shows it: one panel per organ (columns) and number of
    nodes (rows), one box per setup."""
    plt = pyplot()
    organs = [o for o in ORGAN_ID if any(o in ms[0]["dice"] for ms in runs.values())]
    node_counts = sorted({ms[0]["nodes"] for ms in runs.values()})
    fig, axes = plt.subplots(
        len(node_counts),
        len(organs),
        figsize=(3.2 * len(organs), 4.2 * len(node_counts)),
        squeeze=False,
    )
    for row, nodes in zip(axes, node_counts):
        for ax, organ in zip(row, organs):
            names = [
                n for n, ms in runs.items() if ms[0]["nodes"] == nodes and organ in ms[0]["dice"]
            ]
            if not names:  # e.g. kidneys with two nodes: no site labelled them
                ax.set_axis_off()
                continue
            # every (seed, test case) Dice of a setup in one box
            ax.boxplot(
                [[v for m in runs[n] for v in m["dice"][organ]["cases"]] for n in names],
                showmeans=True,
            )
            ax.set_xticks(range(1, len(names) + 1), names, rotation=70, fontsize=7)
            ax.set_title(f"{organ}, {nodes} node(s)" if len(node_counts) > 1 else organ)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(axis="y", alpha=0.3)
        row[0].set_ylabel("Dice per test case")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OVERLAY_COLOURS = {
    "liver": (0.85, 0.35, 0.2),
    "spleen": (0.2, 0.5, 0.9),
    "pancreas": (0.95, 0.8, 0.2),
    "kidneys": (0.3, 0.8, 0.4),
}


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
    """One column per (title, label map) over the case's CT: an axial slice above a coronal one,
    both through the organs' centre, in radiological convention with R and L marked."""
    plt = pyplot()
    fg = torch.nonzero(case.label > 0).float().mean(0).round().long() if (case.label > 0).any() \
        else torch.tensor(case.label.shape) // 2
    sx, sy, sz = case.spacing
    fig, axes = plt.subplots(2, len(panels), figsize=(2.2 * len(panels), 4.6), squeeze=False)
    for j, (title, lab) in enumerate(panels):
        views = (
            (case.hu[:, :, fg[2]], lab[:, :, fg[2]], sy / sx),
            (case.hu[:, fg[1], :], lab[:, fg[1], :], sz / sx),
        )
        for row, (img, seg, aspect) in enumerate(views):
            ax = axes[row][j]
            ax.imshow(
                window(radiological(img), (-175.0, 250.0)).numpy(),
                cmap="gray",
                vmin=0,
                vmax=1,
                aspect=aspect,
            )
            shown = radiological(seg).numpy()
            rgba = np.zeros((*shown.shape, 4))
            for organ, colour in OVERLAY_COLOURS.items():
                rgba[shown == ORGAN_ID[organ]] = (*colour, 0.45)
            ax.imshow(rgba, aspect=aspect)
            for x, letter, align in ((0.03, "R", "left"), (0.97, "L", "right")):
                ax.text(
                    x,
                    0.5,
                    letter,
                    transform=ax.transAxes,
                    ha=align,
                    va="center",
                    color="yellow",
                    fontsize=7,
                    fontweight="bold",
                )
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


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
    return (f"figures: {fig_dir}/dice_boxplot.png, {len(written)} overlay(s), "
            f"{len(curves)} validation curve(s)")
