"""Variants of a training run that are not SegViz itself, as functions passed into
`train.train` (`train.Extensions`): the marginal loss (marginal.py) for the central and FedAvg
models, ConDistFL (condist.py: FedAvg with the marginal loss and conditional distillation), the
oracle (every organ labelled at every site; phantom only), weighted averaging, robust
aggregation, screening updates (robust.py), absent clients and DP.

    python -m experiments train [train.py flags] [--marginal | --condist | --oracle | --weighted |
                                  --dropout P | --aggregate median | --max-update-norm N |
                                  --norm-factor F | --dp-clip C --dp-noise S]
    python -m experiments train --resume OUT
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from checkpoint import STATE_FILE, read_state
from experiments import condist, robust
from experiments.marginal import marginal_for
from settings import Config, add_arguments, config_from_args, is_real, resumed_config, seeds_of
from train import Extensions, add_command_arguments, run_or_stop, seed_for, train_seeds


def add_variant_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("variants (python -m experiments train only)")
    g.add_argument(
        "--marginal",
        action="store_true",
        help="central, fedavg: the marginal loss (unlabelled organs merged into background, not "
             "taught as it; Shi et al. 2021) instead of the plain one",
    )
    g.add_argument(
        "--condist",
        action="store_true",
        help="fedavg: ConDistFL (Wang et al. 2023), the marginal loss plus a conditional "
             "distillation from the global model of the organs a site did not label",
    )
    g.add_argument(
        "--oracle",
        action="store_true",
        help="central on the phantom with every organ labelled at every site: an upper bound",
    )
    g.add_argument(
        "--weighted", action="store_true", help="weight the average by each site's number of cases"
    )
    g.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="each round each client is absent with this probability (seeded; default 0)",
    )
    g.add_argument(
        "--aggregate",
        default="mean",
        choices=tuple(robust.AGGREGATORS),
        help="how shared weights are combined: mean (default), coordinate-wise median, "
             "trimmed-mean",
    )
    g.add_argument(
        "--max-update-norm",
        type=float,
        help="refuse a client's update (its shared weights minus last round's) above this L2 norm",
    )
    g.add_argument(
        "--norm-factor",
        type=float,
        help="refuse a client's update above this multiple of the other clients' median update "
             "norm",
    )
    g.add_argument(
        "--dp-clip",
        type=float,
        help="differential privacy: clip each client's update to this L2 norm",
    )
    g.add_argument(
        "--dp-noise",
        type=float,
        default=0.0,
        help="differential privacy: Gaussian noise of std DP_NOISE x DP_CLIP on the aggregated "
             "update",
    )


VARIANT_DEFAULTS = {
    "marginal": False,
    "condist": False,
    "oracle": False,
    "weighted": False,
    "dropout": 0.0,
    "aggregate": "mean",
    "max_update_norm": None,
    "norm_factor": None,
    "dp_clip": None,
    "dp_noise": 0.0,
}
VARIANT_KEYS = tuple(VARIANT_DEFAULTS)


def variant_settings(a: argparse.Namespace, cfg: Config, p: argparse.ArgumentParser) -> dict:
    """The variant flags that differ from their defaults, checked against the config."""
    checks = [
        (
            a.marginal and cfg.mode not in ("central", "fedavg"),
            "--marginal applies to --mode central and fedavg",
        ),
        (
            a.oracle and a.marginal,
            "--oracle and --marginal cannot be combined (the oracle labels every organ)",
        ),
        (a.condist and cfg.mode != "fedavg", "--condist applies to --mode fedavg"),
        (
            a.condist and (a.marginal or a.oracle),
            "--condist has the marginal loss of its own; --marginal and --oracle do not combine",
        ),
        (
            a.oracle and (cfg.mode != "central" or is_real(cfg)),
            "--oracle needs --mode central and the phantom (every organ labelled at every site)",
        ),
        (not 0 <= a.dropout < 1, "--dropout must be in [0, 1)"),
        (
            a.dropout and cfg.mode == "central",
            "--dropout applies to federated modes (central has one client)",
        ),
        (
            a.max_update_norm is not None and a.max_update_norm <= 0,
            "--max-update-norm must be positive",
        ),
        (a.norm_factor is not None and a.norm_factor <= 0, "--norm-factor must be positive"),
        (a.dp_clip is not None and a.dp_clip <= 0, "--dp-clip must be positive"),
        (
            a.dp_noise < 0 or (a.dp_noise and a.dp_clip is None),
            "--dp-noise needs --dp-clip and must be >= 0",
        ),
    ]
    for bad, why in checks:
        if bad:
            p.error(why)
    return {k: getattr(a, k) for k in VARIANT_KEYS if getattr(a, k) != VARIANT_DEFAULTS[k]}


def variant_name(cfg: Config, v: dict) -> str:
    """The stem of a variant's run name, so that it never takes a plain run's folder: oracle,
    or the mode followed by each changed setting (e.g. segviz-dropout0.2-median)."""
    if v.get("oracle"):
        return "oracle"
    if v.get("condist"):
        return "condistfl"
    tags = {
        "marginal": "marginal",
        "weighted": "weighted",
        "dropout": "dropout{}",
        "aggregate": "{}",
        "max_update_norm": "maxnorm{}",
        "norm_factor": "normfactor{}",
        "dp_clip": "dpclip{}",
        "dp_noise": "dpnoise{}",
    }
    parts = [tags[k].format(v[k]) for k in tags if k in v]
    return "-".join([cfg.mode, *parts]) if parts else ""


def extensions(cfg: Config, v: dict) -> Extensions:
    """The functions a variant passes into train.train, with its random state seeded from the run's.
    """
    ext = Extensions(
        stem=variant_name(cfg, v),
        settings=dict(v),
        full_labels=bool(v.get("oracle")),
        weighted=bool(v.get("weighted")),
        loss=marginal_for if v.get("marginal") else None,
        prepare=condist.prepare if v.get("condist") else None,
    )
    guard = None
    if v.get("max_update_norm") is not None or v.get("norm_factor") is not None:
        guard = robust.Guard(v.get("max_update_norm"), v.get("norm_factor"))
    privacy = None
    if v.get("dp_clip") is not None:
        ext.generators["dp"] = torch.Generator().manual_seed(seed_for(cfg.seed, "dp"))
        privacy = robust.Privacy(v["dp_clip"], v.get("dp_noise", 0.0), ext.generators["dp"])
    if guard or privacy or v.get("aggregate", "mean") != "mean":
        ext.combine = robust.combiner(
            robust.AGGREGATORS[v.get("aggregate", "mean")], guard, privacy
        )
    if v.get("dropout"):
        rng = ext.generators["dropout"] = torch.Generator().manual_seed(
            seed_for(cfg.seed, "dropout")
        )
        ext.present = lambda clients: robust.present(clients, v["dropout"], rng)
    return ext


COMMAND = "python -m experiments train"


def main(argv: list[str] | None = None) -> int:
    """python -m experiments train [train.py flags] [variant flags]: one run with a variant."""
    argv = sys.argv[2:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="python -m experiments train",
        allow_abbrev=False,
        description="train.py with a variant that is not SegViz itself (marginal loss, "
        "oracle, weighted or robust aggregation, absent clients, DP)",
    )
    add_arguments(p)
    add_variant_arguments(p)
    add_command_arguments(p)
    a = p.parse_args(argv)
    if a.resume:
        given_variants = sorted(f"--{k.replace('_', '-')}" for k in VARIANT_KEYS
                                if getattr(a, k) != VARIANT_DEFAULTS[k])
        if given_variants:
            p.error(f"--resume {a.resume} continues the run with its own settings; "
                    f"{', '.join(given_variants)} cannot be given")
        state = read_state(os.path.join(a.resume, STATE_FILE))
        cfg = resumed_config(
            state["config"], a.resume, a, p, lambda name: name in ("device", "rounds")
        )
        status = run_or_stop(cfg, extensions(cfg, state["extensions"]), True, COMMAND)
        return status if isinstance(status, int) else 0
    probe = config_from_args(a, p, check_out=False)
    v = variant_settings(a, probe, p)
    cfg = config_from_args(a, p, variant_name(probe, v))
    return train_seeds(cfg, seeds_of(a), lambda c: extensions(c, v), COMMAND, a.overwrite)
