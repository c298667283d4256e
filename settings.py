"""A run's settings, declared once: the `Config` dataclass, whose fields carry their help text and
choices, and the presets, which are overrides of those fields.

Everything else is derived from the fields: train.py's flags (`add_arguments`), the config saved
with every run and read back (`saved`, `from_saved`), the flags of `python -m experiments train`,
and the Flower app's run config (flower/pyproject.toml; a test keeps its keys equal to the
fields). A run resolves its settings once, at its start (`resolve`): Config's defaults (the
phantom preset), then the chosen preset's overrides, then that preset's overrides for real data
when the cases are real, then the flags given. Nothing later asks which preset it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from common import auto_device, check_writable, resolve_device
from data import ORGANS
from segviz import MODES


def default_cache() -> str:
    """Preprocessed volumes: $SEGVIZ_CACHE, else ~/.cache/segviz."""
    return os.environ.get("SEGVIZ_CACHE", os.path.expanduser("~/.cache/segviz"))


def setting(default: Any, help: str, *, choices: Sequence | None = None, flag: str | None = None,
            metavar: str | tuple[str, ...] | None = None) -> Any:
    """A Config field with what its flag says about it (`flag`: the flag's name where it is not
    the field's, e.g. --seeds for `seed`)."""
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "flag": flag,
        "metavar": metavar,
    }
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Every setting of a run. The defaults are the phantom preset, sized for a 2-core CPU; how
    each was chosen is in docs/choices.md."""

    # the setup
    nodes: int = setting(4, "number of sites: 1 liver, 2 + spleen, 3 + pancreas, 4 + kidneys",
                         choices=(1, 2, 3, 4))
    mode: str = setting(
        "segviz", "training setup (the paper's figure 2; segviz.MODES)", choices=MODES
    )
    fedbn: bool = setting(False, "segviz only: keep normalisation layers local too (FedBN)")
    preset: str = setting(
        "phantom",
        "phantom: a small model for a CPU; paper: the original's model "
        "and recipe (docs/paper-preset.md)",
        choices=("phantom", "paper"),
    )
    seed: int = setting(0, "seeds of data, weights and sampling: one run each, in OUT/seed-S, "
                           "then the mean ± std across them", flag="--seeds",
                        metavar="S")
    # the network
    channels: tuple[int, ...] = setting((16, 32, 64, 128), "U-Net widths, one per resolution level",
                                        metavar="C,C,...")
    norm: str = setting("instance", "normalisation layers", choices=("instance", "batch"))
    task_stages: int = setting(1, "decoder stages in the task block (1: the top up layer, the "
                                  "original's model.2)")
    # the budget and the optimiser
    rounds: int = setting(100, "federated rounds")
    local_steps: int = setting(4, "optimiser steps per site per round (0: --local-epochs of the "
                                  "site's own data instead)")
    local_epochs: int = setting(0, "with --local-steps 0: epochs of the site's own data per round, "
                                   "an epoch being one batch per two of its cases")
    lr: float = setting(3e-3, "Adam learning rate (constant)")
    loss: str = setting("dicece", "dicece: Dice + cross-entropy; dice: Dice alone, as the original",
                        choices=("dice", "dicece"))
    # the training patches
    spacing: tuple[float, float, float] = setting((3.0, 3.0, 3.0), "working voxel spacing in mm",
                                                  metavar=("X", "Y", "Z"))
    patch: tuple[int, int, int] = setting((64, 64, 32), "training patch in voxels",
                                          metavar=("X", "Y", "Z"))
    volumes_per_batch: int = setting(2, "volumes a batch draws patches from")
    patches_per_volume: int = setting(1, "patches cut from each of those volumes")
    p_affine: float = setting(0.5, "probability of a patch's random rotation about z and scaling")
    p_intensity: float = setting(0.5, "probability of each of a patch's intensity scale and shift")
    # what the sites share
    share_buffers: bool = setting(True, "average normalisation statistics too (--no-share-buffers: "
                                        "parameters only, as the original)")
    # validation, model selection and head fine-tuning
    val_every: int = setting(
        0,
        "every N rounds (and after the last) score each site's model on its "
        "own validation cases (0: never)",
    )
    keep: str = setting("last", "the model of the last round, or of the round of the best mean "
                                "validation Dice (needs --val-every)", choices=("last", "best"))
    finetune_epochs: int = setting(0, "after federation, epochs of head-only training per site "
                                      "(binary modes), each keeping its best validation epoch")
    # test time
    test: bool = setting(True, "score the test set after training (--no-test: train and validate "
                               "only, for choosing settings on validation)")
    roi: tuple[int, int, int] | None = setting(None, "sliding window at test time in voxels "
                                                     "(none: the patch)", metavar=("X", "Y", "Z"))
    overlap: float = setting(0.25, "overlap of the sliding windows at test time, in [0, 1)")
    blend: str = setting("gaussian", "how overlapping windows are blended",
                         choices=("gaussian", "constant"))
    largest: bool = setting(True, "at test time keep each organ's largest connected component(s)")
    # where the run happens and what it reads
    device: str = setting("auto", "auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, "
                                  "cuda[:N] or mps")
    amp: bool = setting(False, "mixed precision for training and inference: bfloat16 autocast "
                               "(float16 with a gradient scaler on CUDA GPUs without bfloat16); "
                               "for GPUs, where it saves memory and time")
    out: str = setting("", "output folder: each seed's run in OUT/seed-S (default runs/NAME: the "
                           "run's name, e.g. segviz-4, segviz-fedbn-4 or a variant's "
                           "fedavg-marginal-4, then the preset and the data where they are not "
                           "the phantom's)")
    cache: str = setting(default_cache(), "folder for preprocessed volumes (default "
                                          "~/.cache/segviz or $SEGVIZ_CACHE)")
    data_root: str | None = setting(None, "folder holding the public datasets as unpacked "
                                          "(Task03_Liver, Task09_Spleen, Task07_Pancreas, kits19 "
                                          "or Task040_KiTS, BTCV); without it the phantom is used",
                                    metavar="DIR")
    # setting() makes a dict's default with a factory: each Config gets a dict of its own
    data: dict[str, str] = setting(  # noqa: RUF009
        {}, "a dataset that is not under --data-root, one flag per dataset; SITE is liver, spleen, "
            "pancreas, kidneys or test", metavar="SITE=PATH")
    val_split: str = setting("auto", "real data: 'original' holds out the last N cases per site as "
                                     "the original code; a fraction F holds out F of them, seeded; "
                                     "auto: when the run validates, the original's split on the "
                                     "original archive, else 0.2; when it does not, none")
    max_cases: int | None = setting(
        None, "use at most this many cases per site and for the test set"
    )
    train_cases: int | None = setting(None, "use at most this many training cases per site (the "
                                            "first ones); the test set stays whole")


# A preset is a set of overrides of Config's defaults (which are the phantom preset's), and of
# further overrides where the cases are real (--data-root, --data).
PRESETS: dict[str, dict[str, Any]] = {
    "phantom": {},
    # the original's recipe, item by item (docs/paper-preset.md)
    "paper": {
        "channels": (16, 32, 64, 128, 256),
        "norm": "batch",
        "patch": (128, 128, 32),
        "patches_per_volume": 4,
        "p_affine": 1.0,
        "p_intensity": 1.0,
        "rounds": 50,
        "local_steps": 0,
        "local_epochs": 10,
        "lr": 1e-4,
        "loss": "dice",
        "spacing": (1.5, 1.5, 2.0),
        "share_buffers": False,
        "val_every": 1,
        "keep": "best",
        "finetune_epochs": 150,
        "roi": (160, 160, 160),
        "blend": "constant",
        "largest": False,
    },
}
REAL_DATA: dict[str, dict[str, Any]] = {
    # few cases a site: more rounds, more context around small organs, every patch augmented, no
    # clean-up at test time (each chosen on validation, docs/choices.md)
    "phantom": {"rounds": 200, "patch": (80, 80, 32), "p_affine": 1.0, "p_intensity": 1.0,
                "largest": False},
    "paper": {},
}
MACHINE = ("device", "out")  # where a run happens, not what it is: not saved with it


def is_real(values: dict | Config) -> bool:
    """Whether the cases are real data (--data-root or --data) rather than the phantom."""
    get = values.get if isinstance(values, dict) else lambda k: getattr(values, k)
    return bool(get("data_root") or get("data"))


def resolve(given: dict[str, Any]) -> Config:
    """The run's settings from the flags given: defaults, preset, real-data overrides, flags.

    What depends on other settings is filled in here too: the sliding window defaults to the
    patch; --val-split auto holds nothing out for a run that reads no validation cases; device
    auto is this machine's best (a device named is checked by `config_from_args`)."""
    preset = given.get("preset", "phantom")
    values = {**PRESETS[preset], **(REAL_DATA[preset] if is_real(given) else {}), **given}
    cfg = Config(**values)
    if cfg.device == "auto":
        cfg = replace(cfg, device=str(auto_device()))
    if cfg.roi is None:
        cfg = replace(cfg, roi=cfg.patch)
    if cfg.val_split == "auto" and not validates(cfg):
        # cases held out that nothing reads would be lost to training
        cfg = replace(cfg, val_split="0")
    return cfg


def validates(cfg: Config) -> bool:
    """Whether the run reads validation cases: curves, model selection, head fine-tuning."""
    finetunes = cfg.finetune_epochs and MODES[cfg.mode].binary  # only binary heads are fine-tuned
    return bool(cfg.val_every or cfg.keep == "best" or finetunes)


def run_name(cfg: Config, stem: str = "") -> str:
    """The run's name: the mode (or a variant's stem, e.g. oracle), -fedbn, -<nodes>."""
    return f"{stem or cfg.mode}{'-fedbn' if cfg.fedbn else ''}-{cfg.nodes}"


def default_out(cfg: Config, stem: str = "") -> str:
    """runs/<name>, followed by what else tells runs apart: the preset when it is not the phantom
    preset, and the data (the --data-root folder's name, or "data" for --data alone)."""
    parts = [run_name(cfg, stem)]
    if cfg.preset != "phantom":
        parts.append(cfg.preset)
    if cfg.data_root:  # "." is the folder's own name; "/" has none
        parts.append(os.path.basename(os.path.abspath(cfg.data_root)) or "data")
    elif cfg.data:
        parts.append("data")
    return os.path.join("runs", "-".join(parts))


def problems(cfg: Config) -> list[str]:
    """What is wrong with a resolved config, one line each (the flags' names)."""
    levels = len(cfg.channels)
    divisor = 2 ** (levels - 1)
    checks = [
        (
            cfg.rounds < 1
            or cfg.local_steps < 0
            or (cfg.local_steps == 0 and cfg.local_epochs < 1),
            "--rounds and --local-steps (or --local-epochs) must be at least 1",
        ),
        (not (math.isfinite(cfg.lr) and cfg.lr > 0), "--lr must be a positive number"),
        (cfg.finetune_epochs < 0, "--finetune-epochs must be >= 0"),
        (cfg.max_cases is not None and cfg.max_cases < 1, "--max-cases must be at least 1"),
        (cfg.train_cases is not None and cfg.train_cases < 1, "--train-cases must be at least 1"),
        (cfg.fedbn and cfg.mode != "segviz", "--fedbn applies to --mode segviz only"),
        (
            levels < 2 or min(cfg.channels) < 1,
            "--channels: at least two levels, each at least 1 wide",
        ),
        (
            any(s % divisor for s in cfg.patch),
            f"--channels: {levels} levels need patch sides divisible by {divisor}; the patch is "
            f"{tuple(cfg.patch)}",
        ),
        (
            not 1 <= cfg.task_stages < levels,
            f"--task-stages must be in 1..{levels - 1} for {levels} levels",
        ),
        (
            not all(math.isfinite(v) and v > 0 for v in cfg.spacing),
            "--spacing must be positive numbers",
        ),
        (min(cfg.patch) < 1 or min(cfg.roi or cfg.patch) < 1, "--patch and --roi must be positive"),
        (
            cfg.volumes_per_batch < 1 or cfg.patches_per_volume < 1,
            "--volumes-per-batch and --patches-per-volume must be at least 1",
        ),
        (
            not (0 <= cfg.p_affine <= 1 and 0 <= cfg.p_intensity <= 1),
            "--p-affine and --p-intensity must be in [0, 1]",
        ),
        (
            not valid_split(cfg.val_split),
            f"--val-split {cfg.val_split}: auto, original or a fraction in [0, 1)",
        ),
        (cfg.val_every < 0, "--val-every must be >= 0"),
        (cfg.keep == "best" and not cfg.val_every, "--keep best needs --val-every N"),
        (not 0 <= cfg.overlap < 1, "--overlap must be in [0, 1)"),
    ]
    return [why for bad, why in checks if bad]


def valid_split(text: str) -> bool:
    try:
        return text in ("auto", "original") or 0 <= float(text) < 1
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------
# Flags, derived from the fields
# ---------------------------------------------------------------------------------------


def flag_of(f: dataclasses.Field) -> str:
    """A field's flag: --local-steps for local_steps, unless the field names another."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per Config field (or per field in `only`), with its help and choices. A flag not
    given is absent from the parsed namespace, so `given` tells the flags from the defaults."""
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{meta['help']} ({defaults_text(f)})"}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        kwargs.update(parse_of(hints[f.name], f.name))
        p.add_argument(flag_of(f), **kwargs)


def defaults_text(f: dataclasses.Field) -> str:
    """"default 100; paper preset 50; on real data 200": the field's default and its overrides."""
    def shown(v: Any) -> str:
        if isinstance(v, tuple):
            return ",".join(map(str, v)) if f.name == "channels" else " ".join(map(str, v))
        if isinstance(v, bool):
            return "on" if v else "off"
        return "none" if v is None or v == {} or v == "" else str(v)

    # type: ignore[misc]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    parts = [f"default {shown(default)}"]
    for preset, overrides in PRESETS.items():
        if f.name in overrides:
            parts.append(f"{preset} preset {shown(overrides[f.name])}")
    for preset, overrides in REAL_DATA.items():
        if f.name in overrides:
            parts.append(
                f"on real data {shown(overrides[f.name])}"
                + (f" ({preset} preset)" if preset != "phantom" else "")
            )
    return "; ".join(parts)


def parse_of(tp: Any, name: str) -> dict[str, Any]:
    """argparse's type, nargs and action for a field's type."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType):  # X | None: a flag gives an X
        tp = args[0]
        args = list(typing.get_args(tp))
    if name == "seed":
        return {"type": int, "nargs": "+"}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is tuple and args[-1] is Ellipsis:
        return {"type": int_list}
    if typing.get_origin(tp) is tuple:
        return {"type": args[0], "nargs": len(args)}
    if typing.get_origin(tp) is dict:
        return {"type": site_path, "action": "append"}
    return {"type": tp}


def int_list(text: str) -> tuple[int, ...]:
    """--channels 16,32,64,128: comma-separated integers."""
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def site_path(text: str) -> tuple[str, str]:
    """--data SITE=PATH with a known SITE."""
    roles = (*ORGANS, "test")
    site, sep, path = text.partition("=")
    if not sep or site not in roles or not path:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SITE=PATH with SITE one of {', '.join(roles)}"
        )
    return site, path


def given_of(a: argparse.Namespace) -> dict[str, Any]:
    """The Config fields whose flags were given, as field values."""
    names = {f.name for f in fields(Config)}
    given = {k: v for k, v in vars(a).items() if k in names}
    if "seed" in given:
        given["seed"] = given["seed"][0]
    if "data" in given:
        given["data"] = dict(given["data"])
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def config_from_args(a: argparse.Namespace, p: argparse.ArgumentParser, stem: str = "",
                     check_out: bool = True) -> Config:
    """The parsed flags as a resolved, checked Config (of the first seed; each seed gets its own);
    `stem`: a variant's run name (python -m experiments train). Bad settings: one line, exit 2."""
    given = given_of(a)
    cfg = resolve(given)
    for why in problems(cfg):
        p.error(why)
    if len(set(seeds_of(a))) < len(seeds_of(a)):
        p.error(f"--seeds {' '.join(map(str, seeds_of(a)))}: a seed given twice")
    cfg = replace(cfg, device=str(resolve_device(cfg.device, p)),
                  out=cfg.out or default_out(cfg, stem))
    if check_out:
        check_writable(cfg.out, "--out")
    return cfg


def seeds_of(a: argparse.Namespace) -> list[int]:
    return list(getattr(a, "seed", [0]))


# ---------------------------------------------------------------------------------------
# The config saved with a run, and read back
# ---------------------------------------------------------------------------------------


def saved(cfg: Config) -> dict[str, Any]:
    """The config as plain data (JSON, torch's weights_only), without where the run happens."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()
            if k not in MACHINE}


def from_saved(d: dict[str, Any], **where: Any) -> Config:
    """A saved config back as a Config, with where it runs now (`device`, `out`)."""
    names = {f.name for f in fields(Config)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return Config(**values, **where)


def resumed_config(state_config: dict[str, Any], out: str, a: argparse.Namespace,
                   p: argparse.ArgumentParser, allowed: Callable[[str], bool]) -> Config:
    """--resume OUT: the run's own settings (from OUT/state.pt); only --device and a larger
    --rounds may be given (`allowed(field)` says which fields the flags given may set)."""
    given = given_of(a)
    extra = sorted(flag_of(f) for f in fields(Config) if f.name in given and not allowed(f.name))
    if extra:
        p.error(
            f"--resume {out} continues the run with its own settings; {', '.join(extra)} "
            "cannot be given"
        )
    check_writable(out, "--resume")
    cfg = from_saved(
        state_config, out=out, device=str(resolve_device(given.get("device", "auto"), p))
    )
    if "rounds" in given:
        if given["rounds"] < cfg.rounds:
            p.error(
                f"--resume {out}: --rounds {given['rounds']} is fewer than the run's {cfg.rounds}"
            )
        cfg = replace(cfg, rounds=given["rounds"])
    return cfg
