"""A run's settings: the presets, the `Config` dataclass (train.py's flags one for one, and
the config saved with every run), and the flags themselves with their checks.

experiments.py and the Flower app take the same flags through `add_config_arguments`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

from common import check_writable, resolve_device
from data import ORGANS, DataConfig
from segviz import BINARY

MODES = ("single", "central", "fedavg", "segviz")


@dataclass(frozen=True)
class Preset:
    """A training recipe: the network, the patches, the budget and how the model is scored."""

    channels: tuple[int, ...]
    norm: str
    patch: tuple[int, int, int]
    volumes_per_batch: int
    patches_per_volume: int
    p_affine: float  # probability of the random rotation/scaling of a patch
    p_intensity: float  # probability of each of the intensity scale and shift
    rounds: int
    local_steps: int  # optimiser steps per site per round; 0: `local_epochs` of the site's data
    local_epochs: int
    lr: float
    loss: str
    spacing: tuple[float, float, float]
    share_buffers: bool  # average normalisation statistics too (False: parameters only, as the original)
    keep: str  # "last" model, or the "best" on validation Dice
    finetune_epochs: int  # head-only training after federation (task block alone, representation frozen)
    roi: tuple[int, int, int] | None  # sliding window at test time (None: the patch)
    blend: str
    largest: bool  # keep each organ's largest connected component(s) at test time
    real: dict = field(default_factory=dict)  # what differs on real data (--data-root, --data)


PRESETS = {
    # sized for a 2-core laptop CPU: a few minutes for four sites (docs/choices.md: how it was chosen)
    "phantom": Preset(channels=(16, 32, 64, 128), norm="instance", patch=(64, 64, 32), volumes_per_batch=2,
                      patches_per_volume=1, p_affine=0.5, p_intensity=0.5, rounds=100, local_steps=4, local_epochs=0,
                      lr=3e-3, loss="dicece", spacing=(3.0, 3.0, 3.0), share_buffers=True, keep="last",
                      finetune_epochs=0, roi=None, blend="gaussian", largest=True,
                      # few cases a site: more rounds, more context around small organs, every patch augmented;
                      # test-time options of their own (each chosen on validation, docs/choices.md)
                      real={"rounds": 200, "patch": (80, 80, 32), "p_affine": 1.0, "p_intensity": 1.0,
                            "largest": False}),
    # the original's recipe, item by item (docs/paper-preset.md)
    "paper": Preset(channels=(16, 32, 64, 128, 256), norm="batch", patch=(128, 128, 32),
                    volumes_per_batch=2, patches_per_volume=4, p_affine=1.0, p_intensity=1.0, rounds=50,
                    local_steps=0, local_epochs=10, lr=1e-4, loss="dice", spacing=(1.5, 1.5, 2.0),
                    share_buffers=False, keep="best", finetune_epochs=150, roi=(160, 160, 160), blend="constant",
                    largest=False),
}
EVAL_OVERLAP = 0.25  # of sliding windows at test time (eval.py --overlap re-tests with another)


@dataclass
class Config:
    """A run's settings: train.py's flags one for one, and the config saved with the run.

    None means "the preset's"; `resolve` fills those in."""

    nodes: int = 4  # sites: 1 liver, 2 + spleen, 3 + pancreas, 4 + kidneys
    mode: str = "segviz"
    fedbn: bool = False  # segviz: keep normalisation layers local too
    preset: str = "phantom"
    rounds: int | None = None
    local_steps: int | None = None
    lr: float | None = None
    loss: str | None = None
    channels: tuple[int, ...] | None = None
    norm: str | None = None
    task_stages: int = 1
    finetune_epochs: int | None = None
    seed: int = 0
    val_every: int = 0  # score each site's model on its validation cases every N rounds (0: off)
    largest: bool | None = None
    test: bool = True  # False: the test set is not read (choosing settings on validation)
    device: str = "cpu"
    out: str = "runs/segviz-4"
    cache: str | None = None
    data_root: str | None = None
    data: dict[str, str] = field(default_factory=dict)  # site -> dataset path outside data_root
    spacing: tuple[float, float, float] | None = None
    val_split: str = "auto"
    max_cases: int | None = None


def preset_of(cfg: Config) -> Preset:
    """The run's recipe: its preset, with its real-data values when the cases are real."""
    p = PRESETS[cfg.preset]
    return replace(p, **p.real) if data_config(cfg).real else p


def resolve(cfg: Config) -> Config:
    """The config with every preset default filled in (what the run actually uses)."""
    p = preset_of(cfg)
    keys = ("rounds", "local_steps", "lr", "loss", "channels", "norm", "finetune_epochs", "largest", "spacing")
    cfg = replace(cfg, **{k: getattr(p, k) for k in keys if getattr(cfg, k) is None})
    cfg = replace(cfg, channels=tuple(cfg.channels), spacing=tuple(cfg.spacing))
    if cfg.val_split == "auto" and not validates(cfg):
        cfg = replace(cfg, val_split="0")  # cases held out that nothing reads would only be lost to training
    return cfg


def validates(cfg: Config) -> bool:
    """Whether the run reads validation cases: curves, model selection, head fine-tuning."""
    finetunes = cfg.finetune_epochs and cfg.mode in BINARY  # only binary models' heads are fine-tuned
    return bool(cfg.val_every or preset_of(cfg).keep == "best" or finetunes)


def run_name(cfg: Config, stem: str = "") -> str:
    """runs/<name>: the mode (or a variant's stem, e.g. oracle), -fedbn, -<nodes>."""
    return f"{stem or cfg.mode}{'-fedbn' if cfg.fedbn else ''}-{cfg.nodes}"


def data_config(cfg: Config) -> DataConfig:
    """Where the run's cases come from; real data is preprocessed by up to 4 processes."""
    return DataConfig(cfg.cache, cfg.spacing, cfg.max_cases, cfg.data_root, tuple(sorted(cfg.data.items())),
                      cfg.val_split, min(4, os.cpu_count() or 1))


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `Config`, one for one (experiments.py's `train` adds its own to these)."""
    p.add_argument("--nodes", type=int, default=4, choices=(1, 2, 3, 4),
                   help="number of sites: 1 liver, 2 + spleen, 3 + pancreas, 4 + kidneys (default 4)")
    p.add_argument("--mode", default="segviz", choices=MODES, help="training setup (default segviz)")
    p.add_argument("--fedbn", action="store_true", help="segviz only: keep normalisation layers local (FedBN)")
    p.add_argument("--preset", default="phantom", choices=tuple(PRESETS),
                   help="phantom: small model for a CPU (default); paper: the original's model and recipe")
    p.add_argument("--rounds", type=int,
                   help="federated rounds (default: the preset's; phantom 100, on real data 200)")
    p.add_argument("--local-steps", type=int, help="optimiser steps per site per round (default: the preset's)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: the preset's)")
    p.add_argument("--loss", choices=("dice", "dicece"),
                   help="dicece: Dice + cross-entropy; dice: Dice alone, as the original (default: the preset's)")
    p.add_argument("--channels", type=channel_list, metavar="C,C,...",
                   help="U-Net widths, one per resolution level (default: the preset's; phantom 16,32,64,128)")
    p.add_argument("--norm", choices=("instance", "batch"), help="normalisation layers (default: the preset's)")
    p.add_argument("--task-stages", type=int, default=1,
                   help="decoder stages in the task block (default 1: the top up layer, the original's model.2)")
    p.add_argument("--finetune-epochs", type=int,
                   help="after federation, epochs of head-only training per site (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="seeds of data, weights and sampling: one run each, in OUT/seed-S when there are several, "
                        "then the mean ± std across them (default 0)")
    p.add_argument("--val-every", type=int, default=0,
                   help="every N rounds (and after the last) score each site's model on its own validation cases "
                        "(default 0, off)")
    p.add_argument("--largest", action=argparse.BooleanOptionalAction,
                   help="at test time keep each organ's largest connected component(s) (default: the preset's)")
    p.add_argument("--no-test", action="store_true",
                   help="train (and validate) only: the test set is not scored (choosing settings on validation)")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU, else Apple's MPS, else the CPU; default), cpu, cuda[:N] or mps")
    p.add_argument("--out", help="output folder (default runs/<mode>-<nodes>)")
    p.add_argument("--cache", default=default_cache(),
                   help="folder for preprocessed volumes (default ~/.cache/segviz or $SEGVIZ_CACHE)")
    add_source_arguments(p)
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="working voxel spacing in mm (default: the preset's, phantom 3 3 3, paper 1.5 1.5 2)")
    p.add_argument("--val-split", default="auto",
                   help="real data: 'original' holds out the last N cases per site as the original code; a "
                        "fraction F holds out F of them, seeded; auto (default): when the run validates, the "
                        "original's split on the original archive, else 0.2; when it does not, none")
    p.add_argument("--max-cases", type=int, help="use at most this many cases per site and for the test set")


def channel_list(text: str) -> tuple[int, ...]:
    """--channels 16,32,64,128: one positive width per level, at least two levels."""
    try:
        widths = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least two levels, each at least 1 channel wide")
    return widths


def add_source_arguments(p: argparse.ArgumentParser, roles: tuple[str, ...] = (*ORGANS, "test")) -> None:
    """The flags that point at real data (train.py, eval.py, datasets.py inspect)."""
    p.add_argument("--data-root", metavar="DIR",
                   help="folder holding the public datasets as unpacked (Task03_Liver, Task09_Spleen, "
                        "Task07_Pancreas, kits19 or Task040_KiTS, BTCV); without it the phantom is used")
    p.add_argument("--data", action="append", default=[], metavar="SITE=PATH", type=site_path(roles),
                   help=f"a dataset that is not under --data-root, one flag per dataset; SITE is one of "
                        f"{', '.join(roles)}")


def site_path(roles: tuple[str, ...]) -> Callable[[str], tuple[str, str]]:
    """argparse type of --data: SITE=PATH with a known SITE."""
    def parse(text: str) -> tuple[str, str]:
        site, sep, path = text.partition("=")
        if not sep or site not in roles or not path:
            raise argparse.ArgumentTypeError(f"{text!r}: expected SITE=PATH with SITE one of {', '.join(roles)}")
        return site, path
    return parse


def config_of(a: argparse.Namespace, p: argparse.ArgumentParser, stem: str = "", check_out: bool = True) -> Config:
    """The parsed flags as a resolved, checked Config (of the first seed; each seed gets its
    own); `stem`: a variant's run name (experiments.py)."""
    flags = {f.name: getattr(a, f.name) for f in fields(Config) if f.name in vars(a)}
    cfg = resolve(Config(**{**flags, "seed": a.seeds[0], "test": not a.no_test, "out": a.out or "",
                            "device": str(resolve_device(a.device, p)), "data": dict(a.data),
                            "spacing": tuple(a.spacing) if a.spacing else None}))
    preset = preset_of(cfg)
    checks = [
        (cfg.rounds < 1 or cfg.local_steps < 0 or (cfg.local_steps == 0 and not preset.local_epochs),
         "--rounds and --local-steps must be at least 1"),
        (not (math.isfinite(cfg.lr) and cfg.lr > 0), "--lr must be a positive number"),
        (cfg.finetune_epochs < 0, "--finetune-epochs must be >= 0"),
        (cfg.max_cases is not None and cfg.max_cases < 1, "--max-cases must be at least 1"),
        (cfg.fedbn and cfg.mode != "segviz", "--fedbn applies to --mode segviz only"),
        (any(s % 2 ** (len(cfg.channels) - 1) for s in preset.patch),
         f"--channels: {len(cfg.channels)} levels need patch sides divisible by {2 ** (len(cfg.channels) - 1)}; "
         f"the {cfg.preset} preset's patch{' on real data' if preset.patch != PRESETS[cfg.preset].patch else ''} "
         f"is {preset.patch}"),
        (not 1 <= cfg.task_stages < len(cfg.channels),
         f"--task-stages must be in 1..{len(cfg.channels) - 1} for {len(cfg.channels)} levels"),
        (not all(math.isfinite(v) and v > 0 for v in cfg.spacing), "--spacing must be positive numbers"),
        (not valid_split(cfg.val_split), f"--val-split {cfg.val_split}: auto, original or a fraction in [0, 1)"),
        (cfg.val_every < 0, "--val-every must be >= 0"),
    ]
    for bad, why in checks:
        if bad:
            p.error(why)
    cfg.out = cfg.out or os.path.join("runs", run_name(cfg, stem))
    if check_out:
        check_writable(cfg.out, "--out")
    return cfg


def valid_split(text: str) -> bool:
    try:
        return text in ("auto", "original") or 0 <= float(text) < 1
    except ValueError:
        return False


def default_cache() -> str:
    """Preprocessed volumes: $SEGVIZ_CACHE, else ~/.cache/segviz."""
    return os.environ.get("SEGVIZ_CACHE", os.path.expanduser("~/.cache/segviz"))


def resumed_config(saved: dict, out: str, given: list[str], a: argparse.Namespace, p: argparse.ArgumentParser
                   ) -> Config:
    """--resume OUT: the run's own settings (`saved`, from OUT/state.pt); only --device and --rounds
    may change."""
    extra = sorted({g.split("=")[0] for g in given if g.startswith("--")} - {"--resume", "--device", "--rounds"})
    if extra:
        p.error(f"--resume {out} continues the run with its own settings; {', '.join(extra)} cannot be given")
    check_writable(out, "--resume")
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    cfg = Config(**{**saved, "out": out, "device": str(resolve_device(a.device, p))})
    if a.rounds is not None:
        if a.rounds < cfg.rounds:
            p.error(f"--resume {out}: --rounds {a.rounds} is fewer than the run's {cfg.rounds}")
        cfg.rounds = a.rounds
    return cfg


