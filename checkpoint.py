"""What a run leaves behind, written and read in this one place: the trained model (model.pt)
and the training state a killed run resumes from (state.pt). Both are plain data (dicts of
tensors and settings), loaded without unpickling code.

model.pt: the run's config (settings.saved), the network's config, each site's weights (binary
modes) or the one global model's (segviz.kept_states), each head's HU window, and where the
cases came from. state.pt: everything a run holds between rounds (train.save_state).
"""

from __future__ import annotations

import argparse
import os

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
