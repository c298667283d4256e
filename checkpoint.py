"""What a run leaves behind, written and read in this one place: the trained model (model.pt)
and the training state a killed run resumes from (state.pt). Both are plain data (dicts of
tensors and settings), loaded without unpickling code. And what a seed's folder holds before a
command trains it: a finished run to keep, a stopped one to resume, or another run's files to
refuse.

model.pt: the run's config (settings.saved), the network's config, each site's weights (binary
modes) or the one global model's (segviz.kept_states), each head's HU window, and where the
cases came from. state.pt: everything a run holds between rounds (train.save_state).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace

import torch

from common import fail, resolve_device, save_torch_atomic
from segviz import trained_model
from settings import Config, from_saved, saved
from unet3d import UNetConfig

MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
MODEL_FORMAT = "segviz-checkpoint/2"  # /2: the whole config; /1 kept some settings beside it
STATE_FORMAT = "segviz-state/4"  # /4: the whole config, so a resumed run needs nothing else


def model_checkpoint(cfg: Config, name: str, organs: list[str], unet: UNetConfig, states: dict,
                     shared_rep: bool, windows: dict, local_steps: dict, source: dict,
                     extensions: dict) -> dict:
    """model.pt's content. `shared_rep`: every site holds the same representation, so one
    forward pass of it serves every head; `source`: where the cases came from (cases.py)."""
    return {
        "format": MODEL_FORMAT,
        "name": name,
        "mode": cfg.mode,
        "nodes": cfg.nodes,
        "organs": organs,
        "config": saved(cfg),
        "unet": unet.to_dict(),
        "shared_rep": shared_rep,
        "windows": {k: list(v) for k, v in windows.items()},
        "local_steps": local_steps,
        "source": source,
        "extensions": extensions,
        "states": states,
    }


def write(blob: dict, path: str) -> None:
    """Write model.pt or state.pt whole or not at all (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_torch_atomic(blob, path)


def _read(path: str, fmt: str, what: str, missing: str = "") -> dict:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"{path}: no such file{missing}")
    except Exception as e:  # truncated, not a torch file, or unsafe content
        fail(f"{path}: cannot be read ({type(e).__name__}); not a complete {what}")
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        fail(f"{path}: not a {what} written by this version of train.py")
    return blob


def read_checkpoint(path: str) -> dict:
    """A model.pt written by train.py; one line and exit 2 for anything else."""
    return _read(path, MODEL_FORMAT, "checkpoint")


def read_state(path: str) -> dict:
    """A state.pt written by train.py; one line and exit 2 for anything else."""
    return _read(path, STATE_FORMAT, "training state", " (nothing to resume)")


def config_of(ckpt: dict, device: str = "cpu", parser: argparse.ArgumentParser | None = None,
              out: str = "") -> Config:
    """The config a checkpoint was trained and tested with, to run on `device` now."""
    if parser is not None:
        device = str(resolve_device(device, parser))
    return from_saved(ckpt["config"], device=device, out=out)


def model_of(ckpt: dict) -> torch.nn.Module:
    """The model a checkpoint holds, HU in (segviz.trained_model)."""
    return trained_model(
        UNetConfig.from_dict(ckpt["unet"]),
        ckpt["mode"],
        ckpt["states"],
        ckpt["windows"],
        ckpt["shared_rep"],
    )


# ---------------------------------------------------------------------------------------
# A seed's folder: a finished run to keep, a stopped one to resume, or another run's
# ---------------------------------------------------------------------------------------


def plan_seeds(cfg: Config, seeds: Sequence[int], variant: dict, overwrite: bool,
               command: str = "python train.py") -> list[tuple[Config, str]]:
    """What each seed's folder OUT/seed-S gets: "train" (nothing there, or --overwrite),
    "resume" (a state.pt of these settings) or "keep" (a finished run of these settings). A
    folder holding a run of other settings is refused, and so is a command whose every seed has
    finished: one line, exit 2, nothing touched; --overwrite trains them again."""
    plan = []
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed, out=os.path.join(cfg.out, f"seed-{seed}"))
        plan.append((seed_cfg, "train" if overwrite else seed_action(seed_cfg, variant, command)))
    if plan and all(action == "keep" for _, action in plan):
        fail(f"--out {cfg.out}: holds a finished run of every seed asked for "
             f"({', '.join(c.out for c, _ in plan)}); --overwrite trains them again, or give "
             "another --out")
    return plan


def seed_action(cfg: Config, variant: dict, command: str = "python train.py") -> str:
    """Keep, resume or train one seed's folder; refuse one that holds another run's files. A
    finished run is its metrics.json (its model.pt may have been deleted to save space)."""
    metrics, state = os.path.join(cfg.out, "metrics.json"), os.path.join(cfg.out, STATE_FILE)
    model = os.path.join(cfg.out, MODEL_FILE)
    if os.path.exists(metrics):
        with open(metrics) as f:
            done = json.load(f)
        found, action = (done["config"], done.get("extensions", {})), "keep"
    elif os.path.exists(state):
        blob = read_state(state)
        found, action = (blob["config"], blob["extensions"]), "resume"
    elif os.path.exists(model):  # stopped as it wrote its results: the same run makes it again
        ckpt = read_checkpoint(model)
        found, action = (ckpt["config"], ckpt.get("extensions", {})), "train"
    else:
        return "train"
    (theirs, their_variant), (mine, my_variant) = identity(*found), identity(saved(cfg), variant)
    if (theirs, their_variant) != (mine, my_variant):
        differ = sorted(k for k in {**theirs, **mine} if theirs.get(k) != mine.get(k))
        what = ", ".join(differ) or "the variant"
        longer = (f"; to train it longer: {command} --resume {cfg.out} --rounds N"
                  if differ == ["rounds"] else "")
        fail(f"--out {cfg.out}: holds a run of other settings ({what}); --overwrite replaces it, "
             f"or give another --out{longer}")
    return action


def clear_run(folder: str) -> None:
    """Remove a run's files before training it afresh (--overwrite), so that a fresh run stopped
    early never leaves the old run's model beside its own state, and the old model's test
    scores (eval/) are not read as the new one's."""
    for name in (MODEL_FILE, STATE_FILE, "metrics.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(folder, "eval"), ignore_errors=True)


UNIDENTIFYING = ("cache",)  # settings that do not change what a run is


def identity(config: dict, variant: dict) -> tuple[dict, dict]:
    """What makes two runs the same run: their settings, read as this version reads them (a
    setting added since takes its default) with the data's paths made absolute, and their
    variant."""
    settings = {k: v for k, v in saved(from_saved(config)).items() if k not in UNIDENTIFYING}
    if settings["data_root"]:
        settings["data_root"] = os.path.abspath(settings["data_root"])
    settings["data"] = {site: os.path.abspath(path) for site, path in settings["data"].items()}
    return settings, dict(variant)
