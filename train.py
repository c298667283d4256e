"""Train SegViz or one of its baselines, then evaluate on the fully labelled test set.

    python train.py --nodes 4 --mode segviz

Modes (the paper's figure 2):
    single   A  each site trains its own binary model alone
    central  B  one (1 + K)-class model on the pooled data; unlabelled organs count as background
    fedavg   C  the central model trained at each site; every key averaged each round
    segviz   D  shared representation averaged, task heads kept local; --fedbn keeps norms local too
    oracle      phantom only: the central model with every organ labelled at every site (upper bound)

Every setup for several node counts and seeds, and their comparison: `python experiments.py suite`.

Every mode gets the same budget: nodes x rounds x local steps optimiser steps of one batch.
The state is saved every round; `python train.py --resume OUT` continues a killed run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import fl
import robust
import segviz
from common import check_writable, fail, resolve_device, save_torch_atomic, write_json_atomic
from data import (
    NODE_SITES,
    ORGAN_ID,
    WINDOWS,
    DataError,
    PatchSampler,
    SamplerConfig,
    window,
)
from datasets import add_source_arguments, real_federation, real_validation, source_overrides
from eval import (
    CHECKPOINT_FORMAT,
    evaluate,
    format_metric_tables,
    format_table,
    primary_scoring,
    scored_metrics,
)
from phantom import PhantomSpec, phantom_federation, phantom_validation
from unet3d import UNet3D, UNetConfig

MODES = ("single", "central", "fedavg", "segviz", "oracle")
POOLED = ("central", "oracle")  # one model trained on every site's data


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


PRESETS = {
    # sized for a 2-core laptop CPU: a few minutes for four sites (docs/choices.md: how it was chosen)
    "phantom": Preset(channels=(16, 32, 64, 128), norm="instance", patch=(48, 48, 32), volumes_per_batch=2,
                      patches_per_volume=1, p_affine=0.5, p_intensity=0.5, rounds=100, local_steps=4,
                      local_epochs=0, lr=3e-3, loss="dicece", spacing=(3.0, 3.0, 3.0), share_buffers=True,
                      keep="last", finetune_epochs=0, roi=None, blend="constant", largest=True),
    # the original's recipe, item by item (docs/paper-preset.md)
    "paper": Preset(channels=(16, 32, 64, 128, 256), norm="batch", patch=(128, 128, 32), volumes_per_batch=2,
                    patches_per_volume=4, p_affine=1.0, p_intensity=1.0, rounds=50, local_steps=0,
                    local_epochs=10, lr=1e-4, loss="dice", spacing=(1.5, 1.5, 2.0), share_buffers=False,
                    keep="best", finetune_epochs=150, roi=(160, 160, 160), blend="constant", largest=False),
}


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice on the softmax output per sample and class (background included), averaged
    over both."""
    return _soft_dice(torch.softmax(logits, dim=1), target)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice (as `dice_loss`) plus voxel-wise cross-entropy."""
    return dice_loss(logits, target) + F.cross_entropy(logits, target)


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
    return _soft_dice(merged.exp(), t) + F.nll_loss(merged, t)


def _soft_dice(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, probs.dim()))  # the voxels of each sample
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


LOSSES = {"dice": dice_loss, "dicece": dice_ce_loss, "marginal": marginal_loss}


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def channel_list(text: str) -> tuple[int, ...]:
    """--channels 8,16,32,64: one positive width per level, at least two levels."""
    try:
        widths = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least two levels, each at least 1 channel wide")
    return widths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4, choices=(1, 2, 3, 4),
                   help="number of sites: 1 liver, 2 + spleen, 3 + pancreas, 4 + kidneys (default 4)")
    p.add_argument("--mode", default="segviz", choices=MODES, help="training setup (default segviz)")
    p.add_argument("--fedbn", action="store_true", help="segviz only: keep normalisation layers local (FedBN)")
    p.add_argument("--preset", default="phantom", choices=tuple(PRESETS),
                   help="phantom: small model for a CPU (default); paper: the original's model and patch size")
    p.add_argument("--rounds", type=int, help="federated rounds (default from the preset)")
    p.add_argument("--local-steps", type=int, help="optimiser steps per site per round (default from the preset)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default from the preset)")
    p.add_argument("--loss", default=None, choices=tuple(LOSSES),
                   help="dicece: Dice + cross-entropy; dice: Dice alone, as the original (default: the preset's); "
                        "marginal (central, fedavg): unlabelled organs merged into background, not taught as it")
    p.add_argument("--weighted", action="store_true", help="weight the average by each site's number of cases")
    p.add_argument("--task-stages", type=int, default=1, help="decoder stages in the task block (default 1)")
    p.add_argument("--channels", type=channel_list, default=None, metavar="C,C,...",
                   help="U-Net widths, one per resolution level, e.g. 8,16,32,64,128 (default: the preset's; "
                        "phantom 8,16,32,64)")
    p.add_argument("--norm", default=None, choices=("instance", "batch"),
                   help="normalisation layers (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="seeds of data, weights and sampling: one run each, in OUT/seed-S when there are several, "
                        "then the mean ± std across them (default 0)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="after federation, epochs of head-only training per site (default: the preset's)")
    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU, else Apple's MPS, else the CPU; default), cpu, cuda[:N] or mps")
    p.add_argument("--out", default=None, help="output folder (default runs/<mode>-<nodes>)")
    p.add_argument("--cache", default=os.environ.get("SEGVIZ_CACHE", os.path.expanduser("~/.cache/segviz")),
                   help="folder for preprocessed volumes (default ~/.cache/segviz or $SEGVIZ_CACHE)")
    add_source_arguments(p)
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="working voxel spacing in mm (default: the preset's, phantom 3 3 3, paper 1.5 1.5 2)")
    p.add_argument("--val-split", default="auto",
                   help="real data: 'original' holds out the last N cases per site as the original code "
                        "(liver 25, spleen 9, pancreas 56, kidneys 42); a fraction F holds out F of them, "
                        "seeded; auto (default): the original's split on the original archive, else 0.2 "
                        "(at least one case)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that preprocess real data (default min(4, CPUs))")
    p.add_argument("--max-cases", type=int, default=None,
                   help="use at most this many cases per site and for the test set (quick runs, CI)")
    p.add_argument("--resume", metavar="OUT",
                   help="continue the run whose state OUT/state.pt holds (its own settings; --device and a "
                        "larger --rounds may be given)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="each round each client is absent with this probability (seeded; default 0)")
    p.add_argument("--aggregate", default="mean", choices=tuple(robust.AGGREGATORS),
                   help="how shared weights are combined: mean (default), coordinate-wise median, trimmed-mean")
    p.add_argument("--max-update-norm", type=float, default=None,
                   help="refuse a client's update (its shared weights minus last round's) above this L2 norm "
                        "(default: no limit)")
    p.add_argument("--norm-factor", type=float, default=None,
                   help="refuse a client's update above this multiple of the other clients' median update norm, "
                        "e.g. 10 (default: off)")
    p.add_argument("--dp-clip", type=float, default=None,
                   help="differential privacy: clip each client's update to this L2 norm")
    p.add_argument("--dp-noise", type=float, default=0.0,
                   help="differential privacy: Gaussian noise of std DP_NOISE x DP_CLIP on the aggregated update")
    p.add_argument("--val-every", type=int, default=0,
                   help="every N rounds (and after the last) score each site's model on that site's "
                        "validation cases (phantom: 2 extra per site; real data: the --val-split ones); "
                        "default 0, off")
    p.add_argument("--largest", action=argparse.BooleanOptionalAction, default=None,
                   help="at test time keep each organ's largest connected component(s) (default: the preset's)")
    p.add_argument("--eval-overlap", type=float, default=0.25, help="sliding-window overlap at test time")
    p.add_argument("--no-test", action="store_true",
                   help="train (and validate) only: the test set is not read (choosing settings on validation)")
    args = p.parse_args(argv)
    args.seed = args.seeds[0]
    if args.resume:
        adopt_saved_settings(args, p, explicit_flags(sys.argv[1:] if argv is None else argv))

    preset = PRESETS[args.preset]
    args.rounds = preset.rounds if args.rounds is None else args.rounds
    args.local_steps = preset.local_steps if args.local_steps is None else args.local_steps
    args.lr = preset.lr if args.lr is None else args.lr
    for key in ("loss", "norm", "largest", "finetune_epochs"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key))
    if args.finetune_epochs < 0:
        p.error("--finetune-epochs must be >= 0")
    if args.rounds < 1 or args.local_steps < 0 or (args.local_steps == 0 and not preset.local_epochs):
        p.error("--rounds and --local-steps must be at least 1")
    if args.lr <= 0:
        p.error("--lr must be positive")
    if args.max_cases is not None and args.max_cases < 1:
        p.error("--max-cases must be at least 1")
    if args.fedbn and args.mode != "segviz":
        p.error("--fedbn applies to --mode segviz only")
    if args.loss == "marginal" and args.mode not in ("central", "fedavg"):
        p.error("--loss marginal applies to --mode central and fedavg (multi-class models on partial labels)")
    args.channels = preset.channels if args.channels is None else args.channels
    if any(size % 2 ** (len(args.channels) - 1) for size in preset.patch):
        p.error(f"--channels {','.join(map(str, args.channels))}: {len(args.channels)} levels need patch sides "
                f"divisible by {2 ** (len(args.channels) - 1)}; the {args.preset} preset's patch is {preset.patch}")
    if not 0 <= args.task_stages < len(args.channels):
        p.error(f"--task-stages must be in 0..{len(args.channels) - 1} for {len(args.channels)} levels")
    if not 0 <= args.eval_overlap < 1:
        p.error("--eval-overlap must be in [0, 1)")
    if args.spacing is not None and min(args.spacing) <= 0:
        p.error("--spacing must be positive")
    if args.val_split not in ("auto", "original"):
        try:
            ok = 0 <= float(args.val_split) < 1
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--val-split {args.val_split}: must be auto, original or a fraction in [0, 1)")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.val_every < 0:
        p.error("--val-every must be >= 0")
    if not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1)")
    if args.dropout and args.mode in POOLED:
        p.error("--dropout applies to federated modes (central has one pooled client)")
    if args.max_update_norm is not None and args.max_update_norm <= 0:
        p.error("--max-update-norm must be positive")
    if args.norm_factor is not None and args.norm_factor <= 0:
        p.error("--norm-factor must be >= 0")
    if args.dp_clip is not None and args.dp_clip <= 0:
        p.error("--dp-clip must be positive")
    if args.dp_noise < 0 or (args.dp_noise and args.dp_clip is None):
        p.error("--dp-noise needs --dp-clip and must be >= 0")
    args.overrides = source_overrides(args)
    args.real = bool(args.data_root or args.overrides)
    if args.real and args.mode == "oracle":
        p.error("--mode oracle needs every organ labelled at every site: the phantom only")
    args.device = resolve_device(args.device, p)
    name = run_name(args.mode, args.nodes, args.fedbn, args.loss == "marginal")
    args.name = name
    args.out = args.resume or args.out or os.path.join("runs", name)
    check_writable(args.out, "--out")
    return args


def run_name(mode: str, nodes: int, fedbn: bool = False, marginal: bool = False) -> str:
    return f"{mode}{'-fedbn' if fedbn else ''}{'-marginal' if marginal else ''}-{nodes}"


# Settings that define a run: a resumed run takes them from its state, and refuses others.
RUN_SETTINGS = ("mode", "nodes", "fedbn", "preset", "finetune_epochs", "local_steps", "lr", "loss", "weighted",
                "task_stages", "channels", "norm", "seed", "cache", "data_root", "data", "spacing", "val_split",
                "max_cases", "largest", "eval_overlap", "dropout", "aggregate", "max_update_norm", "norm_factor",
                "dp_clip", "dp_noise", "val_every")


def explicit_flags(argv: list[str]) -> set[str]:
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def adopt_saved_settings(args: argparse.Namespace, p: argparse.ArgumentParser, given: set[str]) -> None:
    """--resume OUT: take the run's settings from OUT/state.pt; a differing flag is refused."""
    path = os.path.join(args.resume, STATE_FILE)
    saved = load_state(path)["settings"]
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        p.error(f"--resume {args.resume} writes to its own folder; drop --out {args.out}")
    for key in RUN_SETTINGS:
        mine = getattr(args, key)
        theirs = saved[key]
        if key == "seed":
            given = given | {"seed"} if "seeds" in given else given
            mine = args.seeds[0]
        if key in given and _norm(mine) != _norm(theirs):
            p.error(f"--resume {args.resume}: the checkpoint was trained with --{key.replace('_', '-')} "
                    f"{theirs}, not {mine}")
        setattr(args, key, theirs)
    if "rounds" in given and args.rounds < saved["rounds"]:
        p.error(f"--resume {args.resume}: --rounds {args.rounds} is fewer than the run's {saved['rounds']}")
    if "rounds" not in given:
        args.rounds = saved["rounds"]
    args.seeds = [args.seed]


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------
# Building the federation
# ---------------------------------------------------------------------------------------


def seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


def site_windows(sites, mode: str = "segviz") -> dict[str, tuple[float, float]]:
    """The HU window of each site's model, in training, validation and test alike.

    A binary site model sees its own site's window, as the original's heads were trained and
    tested. A multi-class model sees one window everywhere: the original's central model used
    -200..304 HU."""
    if mode not in ("single", "segviz"):
        return dict.fromkeys(sites, WINDOWS["pooled"])
    return {s: WINDOWS[s] for s in sites}


def make_sampler(cases, hu_window, binary: bool, cfg: SamplerConfig, device, seed: int,
                 organs: int = len(ORGAN_ID)) -> PatchSampler:
    images = [window(c.hu.clone(), hu_window) for c in cases]
    # binary heads learn "their" organ vs rest; multi-class models learn ORGAN_ID classes of the
    # first `organs` organs (the oracle's labels hold all four, also with fewer nodes)
    labels = [(c.label > 0).to(torch.uint8) if binary else torch.where(c.label <= organs, c.label, 0)
              for c in cases]
    return PatchSampler(images, labels, cfg, device=sampler_device(device), seed=seed)


def sampler_device(device: torch.device | str) -> torch.device:
    """Where a site's patch sampler keeps its volumes and cuts batches: the training device, but
    the CPU on Apple's MPS. The sampler resamples labels with nearest-neighbour 3-D grid_sample,
    which MPS lacks (PyTorch 2.9 added bilinear only); `to_model` then moves each batch over."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def to_model(next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], device: torch.device | str
             ) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The sampler's batches on the training device, in the model's memory layout."""
    def batch():
        x, y = next_batch()
        return x.to(device).contiguous(memory_format=torch.channels_last_3d), y.to(device)
    return batch


def round_robin(samplers: list[PatchSampler]):
    """Pooled data for `central`: consecutive steps draw from each site in turn.

    The position is kept in `next_batch.position` (a one-item list) so a resumed run goes on
    where it stopped."""
    position = [0]

    def next_batch():
        s = samplers[position[0] % len(samplers)]
        position[0] += 1
        return s.sample()

    next_batch.position = position
    return next_batch


@dataclass
class Run:
    """Everything a training run holds between rounds (plain data; saved whole each round)."""

    sites: tuple[str, ...]
    organs: list[str]
    unet_cfg: UNetConfig
    model: UNet3D
    optimizer: torch.optim.Optimizer
    clients: list[fl.Client]
    samplers: dict[str, PatchSampler]
    pooled: object | None  # central's round-robin batch source (its position is state)
    keys: list[str]  # the shared state-dict keys
    local_steps: dict[str, int]  # optimiser steps per round of each client
    dropout_rng: torch.Generator
    privacy: robust.Privacy | None
    log: list[str]  # absences and refused updates, one line each
    norms: list[dict[str, float]]  # per round: each present client's update norm
    validation: list[dict]  # {"round": r, site: Dice on that site's validation cases}
    best: dict | None = None  # keep="best": {"round", "score", "states"} of the best validation so far
    # training time of the processes before a resume, so a run's seconds are its whole cost
    earlier_train_seconds: float = 0.0
    starts: int = 1
    started: float = field(default_factory=time.time)


def build_run(args: argparse.Namespace, train_cases: dict, only: Sequence[str] | None = None) -> Run:
    """The federation at round 0: sites, samplers, one live model, clients as plain data.

    `only`: build samplers and clients for these sites alone (a Flower SuperNode holds one
    site's data, the Flower server none); the model, organs and shared keys stay the whole
    federation's."""
    preset = PRESETS[args.preset]
    sites = NODE_SITES[args.nodes]
    local = sites if only is None else tuple(only)
    organs = [s for s in ORGAN_ID if s in sites]  # sites and organs coincide in order
    windows = site_windows(sites, args.mode)
    binary = args.mode in ("single", "segviz")
    unet_cfg = UNetConfig(classes=2 if binary else len(organs) + 1, channels=tuple(args.channels),
                          norm=args.norm, task_stages=args.task_stages)
    sampler_cfg = SamplerConfig(patch=preset.patch, volumes_per_batch=preset.volumes_per_batch,
                                patches_per_volume=preset.patches_per_volume, p_spatial=preset.p_affine,
                                p_intensity=preset.p_intensity)
    samplers = {s: make_sampler(train_cases[s], windows[s], binary, sampler_cfg, args.device,
                                seed_for(args.seed, s), len(organs)) for s in local}
    # channels-last 3D convolutions are ~12% faster on CPU (oneDNN) and the layout Tensor Cores want
    model = UNet3D(unet_cfg).to(args.device, memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    pooled = None
    # one live model trains; every client is only its stored state, on the device if all fit
    store = fl.choose_store(torch.device(args.device), len(sites), fl.state_bytes(model))
    if args.mode in POOLED:
        pooled = round_robin([samplers[s] for s in sites])
        loss = pooled_loss(args.loss, pooled, sites)
        clients = [fl.new_client("pooled", model, optimizer, to_model(pooled, args.device), loss, store=store)]
        local_steps, keys = {"pooled": sum(steps_per_round(args, train_cases[s]) for s in sites)}, []
    else:
        clients = [fl.new_client(s, model, optimizer, to_model(samplers[s].sample, args.device),
                                 site_loss(args.loss, s),
                                 weight=len(train_cases[s]), store=store) for s in local]
        local_steps = {s: steps_per_round(args, train_cases[s]) for s in local}
        # the original averaged named_parameters(): normalisation statistics (buffers) stayed local
        parameters = None if preset.share_buffers else {k for k, _ in model.named_parameters()}
        keys = segviz.shared_keys(model.state_dict(), args.mode, args.fedbn, parameters)
    privacy = None
    if args.dp_clip is not None:
        privacy = robust.Privacy(args.dp_clip, args.dp_noise,
                                 torch.Generator().manual_seed(seed_for(args.seed, "dp")))
    return Run(sites, organs, unet_cfg, model, optimizer, clients, samplers, pooled, keys, local_steps,
               torch.Generator().manual_seed(seed_for(args.seed, "dropout")), privacy, [], [], [])


def steps_per_round(args: argparse.Namespace, cases: list) -> int:
    """A site's local work per round: --local-steps, or the preset's epochs of the site's own
    data, an epoch being one pass of batches over its cases (as the original's 10 epochs)."""
    if args.local_steps:
        return args.local_steps
    return PRESETS[args.preset].local_epochs * epoch_steps(args, len(cases))


def epoch_steps(args: argparse.Namespace, cases: int) -> int:
    """One pass over a site's cases, in batches of the preset's volumes."""
    return math.ceil(cases / PRESETS[args.preset].volumes_per_batch)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def site_loss(name: str, site: str) -> Loss:
    """The loss of one site's batches; the marginal loss knows which organ the site labelled."""
    if name == "marginal":
        return functools.partial(marginal_loss, labelled=[ORGAN_ID[site]])
    return LOSSES[name]


def pooled_loss(name: str, pooled: Callable, sites: Sequence[str]) -> Loss:
    """The pooled model's loss: each batch comes from one site in turn (round_robin), so the
    marginal loss reads which site the batch just drawn came from."""
    if name != "marginal":
        return LOSSES[name]
    per_site = [site_loss(name, s) for s in sites]
    return lambda logits, target: per_site[(pooled.position[0] - 1) % len(sites)](logits, target)


def load_validation(args: argparse.Namespace, spacing, spec: PhantomSpec) -> dict[str, list]:
    sites = NODE_SITES[args.nodes]
    if args.real:
        try:
            return real_validation(sites, args.data_root, args.overrides, spacing, args.cache, args.workers,
                                   args.val_split, args.seed, args.max_cases)
        except DataError as e:
            fail(str(e))
    return phantom_validation(sites, min(4, args.max_cases or 4), seed=args.seed, spec=spec, cache_dir=args.cache)


def validate(run: Run, args: argparse.Namespace, val_cases: dict[str, list],
             sites: Sequence[str] | None = None) -> dict[str, float]:
    """Mean Dice of each site's organ on that site's validation cases, by the model the site
    holds now (its own binary model, or the one multi-class model), through the site's window."""
    windows = site_windows(run.sites, args.mode)
    out = {}
    with torch.random.fork_rng(devices=[]):  # building models must not move the training RNG
        for site in sites or run.sites:
            if not val_cases.get(site):  # a site too small to hold a case out
                continue
            if args.mode in ("single", "segviz"):
                state = next(c for c in run.clients if c.name == site).model_state
                net, organs = segviz.MetaModel(run.unet_cfg, {site: state}, {site: windows[site]}, False), [site]
            else:
                net = segviz.MultiClassModel(run.unet_cfg, run.clients[0].model_state, windows[site])
                organs = run.organs
            dice = evaluate(net, val_cases[site], organs, test_roi(args), args.device, args.eval_overlap,
                            PRESETS[args.preset].blend, args.largest, surface=False)
            scoring = "heads" if len(organs) == 1 else "classes"
            out[site] = round(float(np.mean(dice[scoring]["dice"][site])), 6)
    return out


def test_roi(args: argparse.Namespace) -> tuple[int, int, int]:
    preset = PRESETS[args.preset]
    return preset.roi or preset.patch


def keep_if_best(run: Run, scores: dict[str, float], rounds_done: int) -> None:
    """keep="best": remember every client's state at the round of the best mean validation Dice."""
    if not scores:
        return
    score = float(np.mean(list(scores.values())))
    if run.best is None or score > run.best["score"]:
        run.best = {"round": rounds_done, "score": score,
                    "states": {c.name: {k: v.clone() for k, v in c.model_state.items()} for c in run.clients}}


def finetune_heads(run: Run, args: argparse.Namespace, val_cases: dict[str, list], epochs: int) -> None:
    """After federation, each site trains its task block alone (representation frozen) for
    `epochs` of its data, keeping the head of its best validation Dice, as the original's last
    stage. The frozen representation's weights do not move: Adam skips parameters without a
    gradient, and only task parameters get one."""
    for name, p in run.model.named_parameters():
        p.requires_grad_(name.startswith(segviz.TASK_PREFIX))
    per_epoch = {c.name: epoch_steps(args, len(run.samplers[c.name]))
                 for c in run.clients}
    def score(site: str) -> float:  # without validation cases the last epoch is kept
        return validate(run, args, val_cases, [site]).get(site, -1.0)

    for client in tqdm(run.clients, desc="fine-tune heads", disable=None):
        best = (score(client.name), client.model_state)
        for _ in range(epochs):
            fl.local_train(run.model, run.optimizer, client, per_epoch[client.name])
            if (s := score(client.name)) >= best[0]:
                best = (s, client.model_state)
        client.model_state = best[1]
        run.log.append(f"fine-tuned {client.name}'s head: best validation Dice {best[0]:.3f}")
    for p in run.model.parameters():
        p.requires_grad_(True)


def exchange_summary(run: Run) -> str:
    """What leaves each site per round, measured on the tensors that are sent."""
    sent = sum(run.clients[0].model_state[k].numel() * run.clients[0].model_state[k].element_size()
               for k in run.keys)
    return (f"{len(run.keys)}/{len(run.clients[0].model_state)} keys shared | {sent / 1e6:.2f} MB up and "
            f"{sent / 1e6:.2f} MB down per site per round")


# ---------------------------------------------------------------------------------------
# The training state: saved every round, atomically, so a killed run resumes bit for bit
# ---------------------------------------------------------------------------------------

STATE_FILE = "state.pt"
STATE_FORMAT = "segviz-state/2"  # /1: the double-conv U-Net's states, which this network cannot load


def save_state(out: str, run: Run, rounds_done: int, args: argparse.Namespace) -> None:
    blob = {
        "format": STATE_FORMAT, "round": rounds_done, "settings": settings_of(args),
        "unet": run.unet_cfg.to_dict(), "log": list(run.log), "norms": list(run.norms),
        "validation": list(run.validation),
        "clients": [{"name": c.name, "model_state": c.model_state, "optim_state": c.optim_state,
                     "history": list(c.history)} for c in run.clients],
        "samplers": {s: sm.gen.get_state() for s, sm in run.samplers.items()},
        "pooled_position": run.pooled.position[0] if run.pooled is not None else 0,
        "dropout_rng": run.dropout_rng.get_state(),
        "dp_rng": run.privacy.generator.get_state() if run.privacy else None,
        "torch_rng": torch.get_rng_state(),
        "train_seconds": run.earlier_train_seconds + time.time() - run.started, "starts": run.starts,
        "best": run.best,
    }
    os.makedirs(out, exist_ok=True)
    save_torch_atomic(blob, os.path.join(out, STATE_FILE))


def load_state(path: str) -> dict:
    """A training state written by save_state, loaded without unpickling code."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"{path}: no such file (nothing to resume)")
    except Exception as e:  # truncated, not a torch file
        fail(f"{path}: cannot be read ({type(e).__name__}); not a complete training state")
    if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT:
        fail(f"{path}: not a training state written by train.py")
    return blob


def restore_state(run: Run, blob: dict, path: str) -> int:
    """Put a saved state back into a freshly built run; returns the rounds already done."""
    if blob["unet"] != run.unet_cfg.to_dict():
        fail(f"{path}: model shape differs from this run's ({blob['unet']} vs {run.unet_cfg.to_dict()})")
    names = [c["name"] for c in blob["clients"]]
    if names != [c.name for c in run.clients]:
        fail(f"{path}: clients {names} differ from this run's {[c.name for c in run.clients]}")
    for client, saved in zip(run.clients, blob["clients"]):
        for k, v in client.model_state.items():
            if k not in saved["model_state"] or saved["model_state"][k].shape != v.shape:
                fail(f"{path}: client {client.name} has no matching {k}")
        device = next(iter(client.model_state.values())).device
        client.model_state = {k: v.to(device) for k, v in saved["model_state"].items()}
        client.optim_state = saved["optim_state"]
        client.history = list(saved["history"])
    for s, state in blob["samplers"].items():
        run.samplers[s].gen.set_state(state)
    if run.pooled is not None:
        run.pooled.position[0] = blob["pooled_position"]
    run.dropout_rng.set_state(blob["dropout_rng"])
    if run.privacy is not None:
        run.privacy.generator.set_state(blob["dp_rng"])
    torch.set_rng_state(blob["torch_rng"])
    run.log[:] = blob["log"]
    run.norms[:] = blob["norms"]
    run.validation[:] = blob["validation"]
    run.best = blob["best"]
    run.earlier_train_seconds = float(blob["train_seconds"])
    run.starts = int(blob["starts"]) + 1
    return int(blob["round"])


def settings_of(args: argparse.Namespace) -> dict:
    return {k: _norm(getattr(args, k)) for k in (*RUN_SETTINGS, "rounds")}


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def load_data(args: argparse.Namespace, spacing, spec: PhantomSpec):
    if args.real:
        try:
            train_cases, test_cases, info = real_federation(
                NODE_SITES[args.nodes], args.data_root, args.overrides, spacing, args.cache, args.workers,
                args.val_split, args.seed, args.max_cases)
        except DataError as e:
            fail(str(e))
        return train_cases, test_cases, {"source": "real", **info, "val_split": args.val_split}
    train_cases, test_cases = phantom_federation(NODE_SITES[args.nodes], seed=args.seed, spec=spec,
                                                 cache_dir=args.cache, full_labels=args.mode == "oracle")
    return train_cases, test_cases, {"source": "phantom"}


def data_spec(args: argparse.Namespace) -> tuple[tuple[float, float, float], PhantomSpec]:
    """The working voxel spacing and the phantom's size (cases per site) of a run."""
    # the preset's spacing for real data too: its patch then covers the same millimetres
    spacing = tuple(args.spacing) if args.spacing else PRESETS[args.preset].spacing
    spec = PhantomSpec(spacing=spacing)
    if args.max_cases:
        spec = PhantomSpec(cases={k: min(v, args.max_cases) for k, v in spec.cases.items()}, spacing=spacing)
    return spacing, spec


def train(args: argparse.Namespace) -> dict:
    """Run one training setup end to end; returns the metrics dict (also written to OUT)."""
    t_start = time.time()
    torch.manual_seed(args.seed)
    preset = PRESETS[args.preset]
    spacing, spec = data_spec(args)
    train_cases, test_cases, data_info = load_data(args, spacing, spec)
    val_cases = load_validation(args, spacing, spec) if validates(args) else {}
    t_data = time.time()
    run = build_run(args, train_cases)
    start = 0
    if args.resume:
        path = os.path.join(args.resume, STATE_FILE)
        start = restore_state(run, load_state(path), path)
        print(f"resuming {path} after round {start}/{args.rounds}")

    combine = combining(args, run)
    run.started = t_data  # this process's training time starts with building the run
    every = args.val_every or (1 if preset.keep == "best" else 0)
    steps = sum(run.local_steps.values())
    print(f"{args.name} seed {args.seed}: {len(run.sites)} site(s) {', '.join(run.sites)} | {args.rounds} rounds x "
          f"{'/'.join(map(str, run.local_steps.values()))} local steps | batch "
          f"{run.samplers[run.sites[0]].cfg.batch} x {preset.patch} | {exchange_summary(run)} | device {args.device}")
    bar = tqdm(total=args.rounds * steps, initial=start * steps, desc="train", unit="step",
               disable=None, dynamic_ncols=True)
    try:
        for r in range(start, args.rounds):
            present = robust.present(run.clients, args.dropout, run.dropout_rng) if args.dropout else run.clients
            report = fl.federated_round(run.model, run.optimizer, run.clients, run.local_steps, run.keys, combine,
                                        weighted=args.weighted, progress=bar.update, present=present)
            bar.update(sum(run.local_steps[name] for name in report.absent))
            line = f"round {r + 1:>3}/{args.rounds}  loss " + "  ".join(
                f"{k} {v:.3f}" for k, v in report.losses.items())
            events = [f"absent: {', '.join(report.absent)}"] if report.absent else []
            events += [f"refused {name}: {why}" for name, why in report.refused.items()]
            run.log += [f"round {r + 1}: {e}" for e in events]
            run.norms.append({k: round(v, 6) for k, v in report.norms.items()})
            if every and ((r + 1) % every == 0 or r + 1 == args.rounds):
                scores = validate(run, args, val_cases)
                run.validation.append({"round": r + 1, **scores})
                if preset.keep == "best":
                    keep_if_best(run, scores, r + 1)
                line += "  | validation " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
            bar.write(line + ("  | " + "; ".join(events) if events else ""))
            save_state(args.out, run, r + 1, args)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted; the state after the last full round is in {os.path.join(args.out, STATE_FILE)}: "
              f"python train.py --resume {args.out}", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()
    if run.best is not None:
        for c in run.clients:
            c.model_state = run.best["states"][c.name]
        run.log.append(f"kept the model of round {run.best['round']} (best mean validation Dice "
                       f"{run.best['score']:.3f})")
    if args.finetune_epochs and args.mode in ("single", "segviz"):
        finetune_heads(run, args, val_cases, args.finetune_epochs)
    t_trained = time.time()
    return finish(args, run, test_cases, spec, spacing, data_info, (t_start, t_data, t_trained))


def combining(args: argparse.Namespace, run: Run) -> fl.Combine:
    """The plain mean, unless a robustness option asks for a guard, another aggregate or DP."""
    guard = None
    if args.max_update_norm is not None or args.norm_factor is not None:
        guard = robust.Guard(args.max_update_norm, args.norm_factor)
    if guard is None and run.privacy is None and args.aggregate == "mean":
        return fl.mean
    return robust.combiner(robust.AGGREGATORS[args.aggregate], guard, run.privacy)


def validates(args: argparse.Namespace) -> bool:
    """Whether the run reads its validation cases: curves, model selection, head fine-tuning."""
    preset = PRESETS[args.preset]
    return bool(args.val_every or preset.keep == "best" or args.finetune_epochs)


def finish(args, run: Run, test_cases, spec, spacing, data_info, times) -> dict:
    """Assemble the final model, test it, write model.pt and metrics.json."""
    t_start, t_data, t_trained = times
    preset = PRESETS[args.preset]
    windows = site_windows(run.sites, args.mode)
    clients = run.clients
    # one representation pass serves every head only where the sites share all of it
    rep_keys = [k for k in clients[0].model_state if k.startswith(segviz.REP_PREFIX)]
    shared_rep = args.mode == "segviz" and set(rep_keys) <= set(run.keys)
    if args.mode in ("single", "segviz"):
        states = {c.name: c.model_state for c in clients}
        net = segviz.MetaModel(run.unet_cfg, states, windows, shared_rep)
    else:
        states = {"global": clients[0].model_state}
        net = segviz.MultiClassModel(run.unet_cfg, states["global"], WINDOWS["pooled"])
    primary = primary_scoring(args.mode)
    per_case = {} if args.no_test else evaluate(net, test_cases, run.organs, test_roi(args), args.device,
                                                 args.eval_overlap, preset.blend, args.largest, primary=primary)
    scored = scored_metrics(per_case, primary)
    by_scoring = scored["by_scoring"]
    t_end = time.time()
    # a resumed run counts the training time of its earlier processes too (not their data loading)
    train_seconds = run.earlier_train_seconds + t_trained - t_data
    data_seconds = t_data - t_start
    seconds = t_end - t_start + run.earlier_train_seconds

    config = {
        "mode": args.mode, "nodes": args.nodes, "fedbn": args.fedbn, "preset": args.preset, "seed": args.seed,
        "rounds": args.rounds, "local_steps": run.local_steps, "lr": args.lr,
        "loss": args.loss,
        "weighted": args.weighted, "finetune_epochs": args.finetune_epochs, "shared_rep": shared_rep,
        "unet": run.unet_cfg.to_dict(), "patch": list(preset.patch), "roi": list(test_roi(args)),
        "blend": preset.blend, "batch": run.samplers[run.sites[0]].cfg.batch, "spacing": list(spacing),
        "data": data_info, "max_cases": args.max_cases, "windows": {k: list(v) for k, v in windows.items()},
        "phantom_cases": dict(spec.cases), "cache_dir": args.cache, "shared_keys": len(run.keys),
        "eval_overlap": args.eval_overlap, "largest": args.largest, "dropout": args.dropout,
        "aggregate": args.aggregate, "max_update_norm": args.max_update_norm, "norm_factor": args.norm_factor,
        "dp_clip": args.dp_clip, "dp_noise": args.dp_noise,
    }
    metrics = {"mode": args.mode, "nodes": args.nodes, "seed": args.seed, "organs": run.organs, **scored,
               "seconds": round(seconds, 1), "data_seconds": round(data_seconds, 1),
               "train_seconds": round(train_seconds, 1), "starts": run.starts, "config": config,
               "device": str(args.device), "losses": {c.name: c.history for c in clients}, "events": run.log,
               "update_norms": run.norms, "validation": run.validation}
    save_outputs(args.out, {"format": CHECKPOINT_FORMAT, "name": args.name, "mode": args.mode, "nodes": args.nodes,
                            "organs": run.organs, "config": config, "states": states}, metrics)
    print()
    if by_scoring:
        print(format_metric_tables({f"{args.name} ({k})" if len(by_scoring) > 1 else args.name: v
                                    for k, v in by_scoring.items()}, run.organs))
    if run.validation:
        print("validation Dice (own site's cases, last check): " + "  ".join(
            f"{k} {v:.3f}" for k, v in run.validation[-1].items() if k != "round"))
    if run.log:
        print(f"{len(run.log)} event(s): " + "; ".join(run.log[-5:]) + (" ..." if len(run.log) > 5 else ""))
    resumed = f", over {run.starts} starts" if run.starts > 1 else ""
    print(f"\n{args.name} seed {args.seed}: {seconds:.0f} s in all ({data_seconds:.0f} s data, {train_seconds:.0f} s "
          f"training{resumed}, {t_end - t_trained:.0f} s test) on {args.device}; "
          f"checkpoint {os.path.join(args.out, 'model.pt')}")
    return metrics


def save_outputs(out: str, checkpoint: dict, metrics: dict) -> None:
    """Write model.pt and metrics.json atomically (temporary file, then rename)."""
    os.makedirs(out, exist_ok=True)
    save_torch_atomic(checkpoint, os.path.join(out, "model.pt"))
    write_json_atomic(os.path.join(out, "metrics.json"), metrics)


def seed_summary(results: dict[int, dict]) -> str:
    """Each seed's mean Dice per organ, then the mean ± std across seeds (of those means)."""
    first = next(iter(results.values()))
    organs = first["organs"]
    from experiments import across_seeds

    rows = {f"seed {seed}": m["dice"] for seed, m in results.items()}
    rows[f"mean of {len(results)} seeds"] = {o: across_seeds(list(rows.values()), o) for o in organs}
    return format_table(rows, organs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.resume:
        train(args)
        return 0
    results = {}
    for seed in args.seeds:
        out = seed_folder(args.out, seed) if len(args.seeds) > 1 else args.out
        results[seed] = train(argparse.Namespace(**{**vars(args), "seed": seed, "out": out}))
    if len(results) > 1 and not args.no_test:
        print(f"\n{args.name}, {len(results)} seeds (within a seed: mean ± std over test cases; last row: mean ± "
              f"std over seeds of each seed's mean)")
        print(seed_summary(results))
    return 0


def seed_folder(out: str, seed: int) -> str:
    return os.path.join(out, f"seed-{seed}")


if __name__ == "__main__":
    sys.exit(main())
