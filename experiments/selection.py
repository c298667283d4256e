"""Choosing defaults on validation cases, never on the test set (docs/choices.md):
`python -m experiments validation DIR ...` tabulates each candidate's validation Dice over seeds;
`python -m experiments eval-options DIR ...` scores the test-time options (blending, clean-up)
on the validation cases from the trained checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from cases import load_validation
from checkpoint import config_of, read_checkpoint
from common import fail
from data import ORGANS, DataError
from eval import case_scores, masks_of, predict_scores
from experiments.compare import read_runs
from segviz import MODES, site_model, site_state
from settings import Config, is_real
from unet3d import UNetConfig


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
    net_cfg, mode = UNetConfig.from_dict(ckpt["unet"]), ckpt["mode"]
    return {s: site_model(net_cfg, mode, s, site_state(mode, ckpt["states"], s), ckpt["windows"][s])
            for s in ckpt["organs"]}


def validation_cases(ckpt: dict, cfg: Config, n: int | None = None) -> dict[str, list]:
    """The validation cases a run validated on, as train.py loads them (real data: from the
    folders it trained on, which must still be there). On the phantom, `n` draws n a site instead
    (the first 4 are training's): more cases, a steadier comparison."""
    real = is_real(cfg)
    held_out = ckpt["source"].get("validation", {})
    if n and real:
        fail("eval-options: --cases: real data's validation cases are its held-out split")
    if real and not any(held_out.values()):
        fail(
            "eval-options: this run held out no validation cases; train with --val-every or "
            "--val-split F"
        )
    try:
        cases = load_validation(cfg, n)
    except DataError as e:
        fail(f"eval-options: {e}")
    if real and {s: sorted(c.name for c in cs) for s, cs in cases.items() if cs} != \
            {s: sorted(names) for s, names in held_out.items() if names}:
        fail("eval-options: the data folders no longer hold the validation cases this run held out")
    return cases


OPTIONS = [("gaussian", True), ("gaussian", False), ("constant", True), ("constant", False)]


def options_dice(model: torch.nn.Module, cases: Sequence, site: str, mode: str, cfg: Config
                 ) -> dict[tuple[str, bool], float]:
    """One site's mean Dice on its cases under each test-time option, as `evaluate` scores them:
    one inference per case and blending, both clean-ups read from it."""
    cfg = replace(cfg, device="cpu")
    model = model.to(cfg.device).eval()
    scoring = "heads" if MODES[mode].binary else "classes"
    dice: dict[tuple[str, bool], list[float]] = {o: [] for o in OPTIONS}
    for case in cases:
        for blend in dict.fromkeys(b for b, _ in OPTIONS):
            scores = predict_scores(model, case, replace(cfg, blend=blend))
            for largest in (c for b, c in OPTIONS if b == blend):
                masks = masks_of(scores, [site], scoring, largest)
                dice[(blend, largest)] += case_scores(
                    masks, case.label, [site], scoring, case.spacing, False
                )["dice"]
    return {o: float(np.mean(v)) for o, v in dice.items()}


def eval_options_table(folders: list[str], n: int | None = None) -> str:
    """Per candidate and test-time option (blending, clean-up): each site's validation Dice and
    their mean, mean ± std over seeds."""
    lines = ["| candidate | blending | clean-up | " + " | ".join(ORGANS) + " | mean over sites |",
             "|---|---|---|" + "---|" * (len(ORGANS) + 1)]
    for folder in folders:
        for name, seeds in read_runs(folder).items():
            # option -> site -> per seed
            dice: dict[tuple, dict[str, list[float]]] = {o: {} for o in OPTIONS}
            for m in seeds:
                ckpt = read_checkpoint(f"{m['dir']}/model.pt")
                cfg = config_of(ckpt)
                cases = validation_cases(ckpt, cfg, n)
                for site, model in site_models(ckpt).items():
                    for option, value in options_dice(
                        model, cases[site], site, ckpt["mode"], cfg
                    ).items():
                        dice[option].setdefault(site, []).append(value)
            for (blend, largest), per_site in dice.items():
                cells = [mean_std(per_site[o]) if o in per_site else "–" for o in ORGANS]
                site_means = np.mean([per_site[s] for s in per_site], axis=0)
                lines.append(
                    f"| {folder} ({name}) | {blend} | {'largest' if largest else 'none'} | "
                    + " | ".join(cells)
                    + f" | {mean_std(list(site_means))} |"
                )
    return "\n".join(lines)
