"""Experiments around SegViz: choosing defaults on validation, never on the test set.

    python experiments.py validation DIR [DIR ...]   # each candidate's validation Dice over seeds
    python experiments.py eval-options DIR [DIR ...] # blending and clean-up, scored on validation

A candidate is a folder of runs trained with `train.py --no-test --seeds ...` (one folder per
seed under it). `validation` tabulates each site's Dice on its own validation cases at the last
check, mean ± std over seeds. `eval-options` rebuilds each run's per-site models from its
checkpoint and scores the validation cases again under each test-time option (Gaussian or
constant blending, with or without the largest-component clean-up). docs/choices.md records
what was chosen this way.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from eval import evaluate, load_checkpoint, read_runs
from segviz import MetaModel, MultiClassModel
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
    return phantom_validation(tuple(cfg["windows"])[:-1], 4, seed=cfg["seed"], spec=spec, cache_dir=cfg["cache_dir"])


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
                for option in OPTIONS:
                    site_means = []
                    for site, model in site_models(ckpt).items():
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
    v = sub.add_parser("validation", help="each candidate's validation Dice, mean ± std over seeds")
    v.add_argument("folders", nargs="+")
    e = sub.add_parser("eval-options", help="blending and clean-up scored on the validation cases")
    e.add_argument("folders", nargs="+")
    args = p.parse_args(argv)
    if args.what == "validation":
        print(validation_table(args.folders))
    else:
        print(eval_options_table(args.folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
