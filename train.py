"""Train SegViz or one of its baselines, then test it: one run, top to bottom.

    python train.py --nodes 4 --mode segviz

settings -> data -> the model and the clients -> rounds (local training, the shared keys
averaged, validation, the state saved) -> the model kept, heads fine-tuned -> test -> save.

Modes (the paper's figure 2; segviz.MODES is the table):
    single   A  each site trains its own binary model alone
    central  B  one (1 + K)-class model on the pooled data; unlabelled organs count as background
    fedavg   C  that multi-class model trained at each site; every key averaged each round
    segviz   D  binary models; only the representation is averaged, heads stay local;
                --fedbn keeps normalisation layers local too

Every setup gets the same budget: rounds x local steps of one batch per site. Variants that are
not SegViz itself (the marginal loss, ConDistFL, the oracle, robust aggregation, absent
clients, DP) pass functions into `train` (`Extensions`): `python -m experiments train`. The
state is saved between rounds; `--resume OUT` continues a killed run bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
import segviz
from cases import load_federation, load_validation
from checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    STATE_FORMAT,
    clear_run,
    model_checkpoint,
    model_of,
    plan_seeds,
    read_state,
    write,
)
from common import amp_dtype, fail, write_json_atomic
from data import NODE_SITES, ORGAN_ID, DataError, site_windows
from eval import evaluate
from report import across_seeds, format_metric_tables, format_table, scored_metrics
from sampler import PatchSampler, SamplerConfig, round_robin, site_sampler
from segviz import MODES
from settings import (
    Config,
    add_arguments,
    config_from_args,
    resumed_config,
    run_name,
    saved,
    seeds_of,
    validates,
)
from unet3d import UNet3D, UNetConfig

# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_dice(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - Dice per sample and class (background included), averaged over both; `eps` smooths
    numerator and denominator alike (MONAI's DiceLoss with smooth_nr = smooth_dr = eps)."""
    onehot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, probs.dim()))  # the voxels of each sample
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice on the softmax output (the original's loss)."""
    return soft_dice(torch.softmax(logits, dim=1), target)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice plus voxel-wise cross-entropy."""
    return dice_loss(logits, target) + F.cross_entropy(logits, target)


LOSSES = {"dice": dice_loss, "dicece": dice_ce_loss}


# ---------------------------------------------------------------------------------------
# What python -m experiments train may change: functions passed in (train.py uses defaults)
# ---------------------------------------------------------------------------------------

# a client's loss from the run's config, the sites its batches come from, and which of them
# gave the batch just drawn (the pooled model draws from each site in turn)
LossFor = Callable[[Config, Sequence[str], Callable[[], int]], Loss]


@dataclass
class Extensions:
    """What a variant changes in a run (experiments/variants.py); train.py passes the defaults."""

    stem: str = ""  # the run's name in place of the mode, e.g. "oracle" or "fedavg-marginal"
    # saved with the run; experiments rebuilds from them
    settings: dict = field(default_factory=dict)
    loss: LossFor | None = None  # default: LOSSES[cfg.loss]
    full_labels: bool = False  # every organ labelled at every site (phantom only: the oracle)
    combine: fl.Combine = fl.mean
    weighted: bool = False  # weight the average by each site's number of cases
    present: Callable[[list[fl.Client]], list[fl.Client]] | None = None  # who takes part in a round
    # changes the federation once it is built (ConDistFL: each client's teacher and its loss)
    prepare: Callable[[Run], None] | None = None
    # their random state, saved
    generators: dict[str, torch.Generator] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# The federation at round 0
# ---------------------------------------------------------------------------------------


def seed_for(*parts: object) -> int:
    """A seed for one part of a run (a site's sampler, a variant's draws) from the run's seed."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass
class Run:
    """Everything a training run holds between rounds (plain data; saved whole between rounds)."""

    cfg: Config
    sites: tuple[str, ...]
    organs: list[str]
    unet_cfg: UNetConfig
    model: UNet3D  # the one live model every client trains in turn
    optimizer: torch.optim.Optimizer
    clients: list[fl.Client]
    samplers: dict[str, PatchSampler]
    pooled: object | None  # the central model's round-robin batch source (its position is state)
    keys: list[str]  # the shared state-dict keys
    local_steps: dict[str, int]  # optimiser steps per round of each client
    ext: Extensions
    log: list[str] = field(default_factory=list)  # absences and refused updates, one line each
    # per round: each client's update norm
    norms: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)  # {"round": r, site: validation Dice}
    # keep="best": {"round", "score", "states"} of the best validation so far
    best: dict | None = None
    earlier_seconds: float = 0.0  # training time of the processes before a resume
    starts: int = 1
    started: float = field(default_factory=time.time)


def build_run(
    cfg: Config, train_cases: dict, ext: Extensions, only: Sequence[str] | None = None
) -> Run:
    """The federation at round 0: samplers, one live model, clients as plain data.

    `only`: samplers and clients for these sites alone (a Flower node holds one site's data, the
    server none); the model, organs and shared keys stay the whole federation's."""
    mode = MODES[cfg.mode]
    sites = NODE_SITES[cfg.nodes]
    organs = [s for s in ORGAN_ID if s in sites]  # sites and organs coincide in order
    windows = site_windows(sites, mode.binary)
    unet_cfg = UNetConfig(classes=2 if mode.binary else len(organs) + 1, channels=cfg.channels,
                          norm=cfg.norm, task_stages=cfg.task_stages)
    sampler_cfg = SamplerConfig(patch=cfg.patch, volumes_per_batch=cfg.volumes_per_batch,
                                patches_per_volume=cfg.patches_per_volume, p_spatial=cfg.p_affine,
                                p_intensity=cfg.p_intensity)
    local = sites if only is None else tuple(only)
    samplers = {s: site_sampler(train_cases[s], windows[s], mode.binary, sampler_cfg, cfg.device,
                                seed_for(cfg.seed, s), len(organs)) for s in local}
    # channels-last: the layout Tensor Cores want (on a CPU the top unit is channels-last anyway)
    model = UNet3D(unet_cfg).to(cfg.device, memory_format=torch.channels_last_3d)
    # foreach: the per-tensor loop's arithmetic (bitwise, on a CPU) in a third less time
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)
    # one live model trains; every client is only its stored state, on the device if all fit
    store = fl.choose_store(torch.device(cfg.device), len(sites), fl.state_bytes(model))
    loss_for = ext.loss or (lambda cfg, sources, which: LOSSES[cfg.loss])
    amp = amp_dtype(cfg.device) if cfg.amp else None
    pooled = None
    if mode.pooled:
        pooled = round_robin([samplers[s] for s in sites])
        loss = loss_for(cfg, sites, lambda: (pooled.position[0] - 1) % len(sites))
        batches = on_device(pooled, cfg.device)
        clients = [fl.new_client("pooled", model, optimizer, batches, loss, store=store, amp=amp)]
        # the pooled model takes every site's steps of a round
        local_steps = {"pooled": sum(steps_per_round(cfg, len(train_cases[s])) for s in sites)}
        keys = []
    else:
        clients = [
            fl.new_client(
                s,
                model,
                optimizer,
                on_device(samplers[s].sample, cfg.device),
                loss_for(cfg, [s], lambda: 0),
                weight=len(train_cases[s]),
                store=store,
                amp=amp,
            )
            for s in local
        ]
        local_steps = {s: steps_per_round(cfg, len(train_cases[s])) for s in local}
        keys = exchanged_keys(model, cfg)
    run = Run(cfg, sites, organs, unet_cfg, model, optimizer, clients, samplers, pooled, keys,
              local_steps, ext)
    if ext.prepare is not None:
        ext.prepare(run)
    return run


def exchanged_keys(model: torch.nn.Module, cfg: Config) -> list[str]:
    """The keys each site sends per round. Without `share_buffers`, parameters only: the original
    averaged named_parameters(), so normalisation statistics (buffers) stayed local."""
    parameters = None if cfg.share_buffers else {k for k, _ in model.named_parameters()}
    return segviz.shared_keys(model.state_dict(), cfg.mode, cfg.fedbn, parameters)


def on_device(
    next_batch: Callable[[], fl.Batch], device: torch.device | str
) -> Callable[[], fl.Batch]:
    """The sampler's batches on the training device, in the model's memory layout."""
    def batch() -> fl.Batch:
        x, y = next_batch()
        return x.to(device).contiguous(memory_format=torch.channels_last_3d), y.to(device)
    return batch


def steps_per_round(cfg: Config, cases: int) -> int:
    """A site's local work per round: local_steps, or local_epochs of the site's own data, an
    epoch being one pass of batches over its cases (as the original's 10 epochs)."""
    return cfg.local_steps or cfg.local_epochs * epoch_steps(cfg, cases)


def epoch_steps(cfg: Config, cases: int) -> int:
    return math.ceil(cases / cfg.volumes_per_batch)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def train(cfg: Config, ext: Extensions | None = None, resume: bool = False) -> dict:
    """Run one setup end to end; returns the metrics (also written to cfg.out)."""
    ext = ext or Extensions()
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    try:
        train_cases, test_cases, data_info = load_federation(cfg, ext.full_labels)
        val_cases = load_validation(cfg) if validates(cfg) else {}
    except DataError as e:
        fail(str(e))
    t_data = time.time()
    run = build_run(cfg, train_cases, ext)
    start = restore_state(run, os.path.join(cfg.out, STATE_FILE)) if resume else 0
    run.started = t_data
    rounds_loop(run, val_cases, start)
    if run.best is not None:
        for c in run.clients:
            c.model_state = run.best["states"][c.name]
        run.log.append(f"kept the model of round {run.best['round']} (best mean validation Dice "
                       f"{run.best['score']:.3f})")
    if cfg.finetune_epochs and MODES[cfg.mode].binary:
        finetune_heads(run, val_cases, cfg.finetune_epochs)
    return finish(run, test_cases, data_info, (t_start, t_data, time.time()))


def rounds_loop(run: Run, val_cases: dict, start: int) -> None:
    """The federated rounds: local training, the shared keys combined, validation, state saved."""
    cfg = run.cfg
    steps = sum(run.local_steps.values())
    print(
        f"{run_name(cfg, run.ext.stem)} seed {cfg.seed}: {len(run.sites)} site(s) "
        f"{', '.join(run.sites)} | {cfg.rounds} rounds x "
        f"{'/'.join(map(str, run.local_steps.values()))} local steps | "
        f"batch {cfg.volumes_per_batch * cfg.patches_per_volume} x {cfg.patch} | "
        f"{exchange_summary(run)} | device {cfg.device}"
    )
    bar = tqdm(
        total=cfg.rounds * steps,
        initial=start * steps,
        desc="train",
        unit="step",
        disable=None,
        dynamic_ncols=True,
    )
    saved_at, save_seconds = time.monotonic(), 0.0
    for r in range(start, cfg.rounds):
        present = run.ext.present(run.clients) if run.ext.present else run.clients
        report = fl.federated_round(
            run.model,
            run.optimizer,
            run.clients,
            run.local_steps,
            run.keys,
            run.ext.combine,
            run.ext.weighted,
            bar.update,
            present,
        )
        bar.update(sum(run.local_steps[name] for name in report.absent))
        losses = "  ".join(f"{k} {v:.3f}" for k, v in report.losses.items())
        line = f"round {r + 1:>3}/{cfg.rounds}  loss {losses}"
        events = [f"absent: {', '.join(report.absent)}"] if report.absent else []
        events += [f"refused {name}: {why}" for name, why in report.refused.items()]
        run.log += [f"round {r + 1}: {e}" for e in events]
        run.norms.append({k: round(v, 6) for k, v in report.norms.items()})
        if cfg.val_every and ((r + 1) % cfg.val_every == 0 or r + 1 == cfg.rounds):
            scores = validate(run, val_cases)
            run.validation.append({"round": r + 1, **scores})
            if cfg.keep == "best":
                keep_if_best(run, scores, r + 1)
            line += "  | validation " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        bar.write(line + ("  | " + "; ".join(events) if events else ""))
        # state.pt (tens of MB) is written after the first and the last round, and in between
        # once training since the last write took SAVE_SPACING times as long as that write did
        if r + 1 == cfg.rounds or time.monotonic() - saved_at >= SAVE_SPACING * save_seconds:
            t = time.monotonic()
            save_state(run, r + 1)
            saved_at, save_seconds = time.monotonic(), time.monotonic() - t
    bar.close()


def exchange_summary(run: Run) -> str:
    """What leaves each site per round, measured on the tensors that are sent."""
    state = run.clients[0].model_state
    sent = sum(state[k].numel() * state[k].element_size() for k in run.keys)
    return (f"{len(run.keys)}/{len(state)} keys shared | "
            f"{sent / 1e6:.2f} MB up and down per site per round")


def validate(
    run: Run, val_cases: dict[str, list], sites: Sequence[str] | None = None
) -> dict[str, float]:
    """Mean Dice of each site's organ on that site's validation cases, by the model the run
    would keep now (each site's own binary model, or the one global model), through the site's
    window."""
    cfg, mode = run.cfg, MODES[run.cfg.mode]
    windows = site_windows(run.sites, mode.binary)
    scoring = "heads" if mode.binary else "classes"
    states = segviz.kept_states(cfg.mode, {c.name: c.model_state for c in run.clients})
    out = {}
    with torch.random.fork_rng(devices=[]):  # building models must not move the training RNG
        for site in sites or run.sites:
            if not val_cases.get(site):  # a site too small to hold a case out
                continue
            state = segviz.site_state(cfg.mode, states, site)
            net = segviz.site_model(run.unet_cfg, cfg.mode, site, state, windows[site])
            organs = [site] if mode.binary else run.organs
            dice = evaluate(net, val_cases[site], organs, (scoring,), cfg, surface=False)
            out[site] = round(float(np.mean(dice[scoring]["dice"][site])), 6)
    return out


def keep_if_best(run: Run, scores: dict[str, float], rounds_done: int) -> None:
    """keep="best": remember every client's state at the round of the best mean validation Dice."""
    if not scores:
        return
    score = float(np.mean(list(scores.values())))
    if run.best is None or score > run.best["score"]:
        states = {c.name: {k: v.clone() for k, v in c.model_state.items()} for c in run.clients}
        run.best = {"round": rounds_done, "score": score, "states": states}


def finetune_heads(run: Run, val_cases: dict[str, list], epochs: int) -> None:
    """After federation, each site trains its task block alone (representation frozen) for
    `epochs` of its data, keeping the head of its best validation Dice, as the original's last
    stage. Frozen weights do not move (Adam skips them); running statistics do, in training
    mode: local ones keep moving, as the original's; shared ones are put back every epoch."""
    for name, p in run.model.named_parameters():
        p.requires_grad_(name.startswith(segviz.TASK_PREFIX))
    for client in tqdm(run.clients, desc="fine-tune heads", disable=None):
        # without validation cases the last epoch is kept
        def score(site: str = client.name) -> float:
            return validate(run, val_cases, [site]).get(site, -1.0)

        shared = {k: client.model_state[k] for k in run.keys}
        best = (score(), client.model_state)
        for _ in range(epochs):
            steps = epoch_steps(run.cfg, len(run.samplers[client.name]))
            fl.local_train(run.model, run.optimizer, client, steps)
            client.model_state.update(shared)
            if (s := score()) >= best[0]:
                best = (s, client.model_state)
        client.model_state = best[1]
        run.log.append(f"fine-tuned {client.name}'s head: best validation Dice {best[0]:.3f}")
    for p in run.model.parameters():
        p.requires_grad_(True)


# ---------------------------------------------------------------------------------------
# The training state: saved between rounds, atomically, so a killed run resumes bit for bit
# ---------------------------------------------------------------------------------------

SAVE_SPACING = 50


def save_state(run: Run, rounds_done: int) -> None:
    """state.pt: everything the run needs to go on after `rounds_done` rounds."""
    samplers = {f"sampler/{s}": sm.gen.get_state() for s, sm in run.samplers.items()}
    variants = {k: g.get_state() for k, g in run.ext.generators.items()}
    blob = {"format": STATE_FORMAT, "round": rounds_done, "config": saved(run.cfg),
            "extensions": run.ext.settings, "log": run.log, "norms": run.norms,
            "validation": run.validation, "best": run.best,
            "clients": [{"name": c.name, "model_state": c.model_state, "optim_state": c.optim_state,
                         "history": c.history, "scaler": c.scaler and c.scaler.state_dict()}
                        for c in run.clients],
            "generators": {**samplers, **variants, "torch": torch.get_rng_state()},
            "pooled_position": run.pooled.position[0] if run.pooled is not None else 0,
            "train_seconds": run.earlier_seconds + time.time() - run.started, "starts": run.starts}
    write(blob, os.path.join(run.cfg.out, STATE_FILE))


def restore_state(run: Run, path: str) -> int:
    """Put a saved state back into a freshly built run; returns the rounds already done."""
    blob = read_state(path)
    if [c["name"] for c in blob["clients"]] != [c.name for c in run.clients]:
        fail(f"{path}: its clients differ from this run's {[c.name for c in run.clients]}")
    for client, kept in zip(run.clients, blob["clients"]):
        shapes = {k: tuple(v.shape) for k, v in kept["model_state"].items()}
        if shapes != {k: tuple(v.shape) for k, v in client.model_state.items()}:
            fail(f"{path}: client {client.name}'s weights do not fit this run's model")
        device = next(iter(client.model_state.values())).device
        client.model_state = {k: v.to(device) for k, v in kept["model_state"].items()}
        client.optim_state, client.history = kept["optim_state"], kept["history"]
        if client.scaler is not None and kept.get("scaler"):  # float16 on both sides
            client.scaler.load_state_dict(kept["scaler"])
    gens = {**{f"sampler/{s}": sm.gen for s, sm in run.samplers.items()}, **run.ext.generators}
    if missing := sorted(set(gens) - set(blob["generators"])):
        fail(f"{path}: no saved random state for {', '.join(missing)}")
    for name, g in gens.items():
        g.set_state(blob["generators"][name])
    torch.set_rng_state(blob["generators"]["torch"])
    if run.pooled is not None:
        run.pooled.position[0] = blob["pooled_position"]
    run.log = blob["log"]
    run.norms = blob["norms"]
    run.validation = blob["validation"]
    run.best = blob["best"]
    run.earlier_seconds, run.starts = float(blob["train_seconds"]), int(blob["starts"]) + 1
    print(f"resuming {path} after round {blob['round']}/{run.cfg.rounds}")
    return int(blob["round"])


# ---------------------------------------------------------------------------------------
# The result: the final model, tested, saved
# ---------------------------------------------------------------------------------------


def final_checkpoint(run: Run, name: str, data_info: dict) -> dict:
    """model.pt: each site's model (single, segviz) or the one global model, with the config
    (`data_info`: where the cases came from, as load_federation says)."""
    cfg = run.cfg
    rep_keys = [k for k in run.clients[0].model_state if k.startswith(segviz.REP_PREFIX)]
    # one representation pass serves every head only where the sites share all of it
    shared_rep = MODES[cfg.mode].shares == "rep" and set(rep_keys) <= set(run.keys)
    states = segviz.kept_states(cfg.mode, {c.name: c.model_state for c in run.clients})
    windows = site_windows(run.sites, MODES[cfg.mode].binary)
    return model_checkpoint(cfg, name, run.organs, run.unet_cfg, states, shared_rep, windows,
                            run.local_steps, data_info, run.ext.settings)


def finish(run: Run, test_cases: list, data_info: dict, times: tuple[float, float, float]) -> dict:
    """Test the final model, write model.pt and metrics.json, print the summary."""
    cfg = run.cfg
    t_start, t_data, t_trained = times
    name = run_name(cfg, run.ext.stem)
    ckpt = final_checkpoint(run, name, data_info)
    scorings = MODES[cfg.mode].scorings
    per_case = evaluate(model_of(ckpt), test_cases, run.organs, scorings, cfg) if cfg.test else {}
    scored = scored_metrics(per_case, scorings[0], [c.name for c in test_cases] if cfg.test else [])
    t_end = time.time()
    train_seconds = run.earlier_seconds + t_trained - t_data  # with the processes before a resume
    seconds = t_end - t_start + run.earlier_seconds
    metrics = {
        "name": name,
        "mode": cfg.mode,
        "nodes": cfg.nodes,
        "seed": cfg.seed,
        "organs": run.organs,
        **scored,
        "seconds": round(seconds, 1),
        "data_seconds": round(t_data - t_start, 1),
        "train_seconds": round(train_seconds, 1),
        "starts": run.starts,
        "config": ckpt["config"],
        "local_steps": run.local_steps,
        "extensions": run.ext.settings,
        "source": data_info,
        "device": str(cfg.device),
        "losses": {c.name: c.history for c in run.clients},
        "events": run.log,
        "update_norms": run.norms,
        "validation": run.validation,
    }
    write(ckpt, os.path.join(cfg.out, MODEL_FILE))
    write_json_atomic(os.path.join(cfg.out, "metrics.json"), metrics)
    print()
    if by := scored["by_scoring"]:
        print(
            format_metric_tables(
                {f"{name} ({k})" if len(by) > 1 else name: v for k, v in by.items()}, run.organs
            )
        )
    if run.validation:
        print("validation Dice (own site's cases, last check): " + "  ".join(
            f"{k} {v:.3f}" for k, v in run.validation[-1].items() if k != "round"))
    if run.log:
        print(
            f"{len(run.log)} event(s): "
            + "; ".join(run.log[-5:])
            + (" ..." if len(run.log) > 5 else "")
        )
    resumed = f", over {run.starts} starts" if run.starts > 1 else ""
    print(
        f"\n{name} seed {cfg.seed}: {seconds:.0f} s in all ({t_data - t_start:.0f} s data, "
        f"{train_seconds:.0f} s training{resumed}, {t_end - t_trained:.0f} s test) on "
        f"{cfg.device}; checkpoint {os.path.join(cfg.out, MODEL_FILE)}"
    )
    return metrics


# ---------------------------------------------------------------------------------------
# Several seeds, and the command line
# ---------------------------------------------------------------------------------------


def train_seeds(cfg: Config, seeds: Sequence[int],
                ext_for: Callable[[Config], Extensions] | None = None,
                command: str = "python train.py", overwrite: bool = False) -> int:
    """Train each seed in OUT/seed-S, then the mean ± std across them. Issued again, the same
    command keeps the seeds that finished, resumes the one that was stopped and trains the rest
    (`plan_seeds`). `ext_for(cfg)`: a variant's extensions for a seed's config; `command`: the
    script that resumes a run. Returns the exit status."""
    ext_for = ext_for or (lambda seed_cfg: Extensions())
    plan = plan_seeds(cfg, seeds, ext_for(cfg).settings, overwrite, command)
    results = {}
    for seed_cfg, action in plan:
        if action == "keep":
            print(f"seed {seed_cfg.seed}: finished in {seed_cfg.out}, kept")
            with open(os.path.join(seed_cfg.out, "metrics.json")) as f:
                results[seed_cfg.seed] = json.load(f)
            continue
        if action == "train":
            clear_run(seed_cfg.out)
        status = run_or_stop(seed_cfg, ext_for(seed_cfg), action == "resume", command, overwrite)
        if isinstance(status, int):
            return status
        results[seed_cfg.seed] = status
    if len(results) > 1 and cfg.test:
        first = next(iter(results.values()))
        rows = {f"seed {seed}": m["dice"] for seed, m in results.items()}
        rows[f"mean of {len(results)} seeds"] = {
            o: across_seeds(list(rows.values()), o) for o in first["organs"]
        }
        print(f"\n{first['name']}, {len(results)} seeds (within a seed: mean ± std over test "
              "cases; last row: mean ± std over seeds of each seed's mean)")
        print(format_table(rows, first["organs"]))
    return 0


def run_or_stop(cfg: Config, ext: Extensions, resume: bool, command: str,
                overwrite: bool = False) -> dict | int:
    """One seed's run; Ctrl-C stops it with a line on how to go on (exit status 130)."""
    try:
        return train(cfg, ext, resume)
    except KeyboardInterrupt:
        state = os.path.join(cfg.out, STATE_FILE)
        if os.path.exists(state):
            again = "the same command again without --overwrite" if overwrite else \
                "the same command again"
            print(f"\ninterrupted; the last saved state is in {state}: issue {again} (finished "
                  f"seeds are kept, this one resumes), or {command} --resume {cfg.out}",
                  file=sys.stderr)
        else:
            print("\ninterrupted before the first round ended; nothing to resume", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_arguments(p)
    add_command_arguments(p)
    a = p.parse_args(argv)
    if a.resume:
        state = read_state(os.path.join(a.resume, STATE_FILE))
        if state["extensions"]:
            fail(
                f"--resume {a.resume}: the run was made by python -m experiments train; resume "
                f"it with python -m experiments train --resume {a.resume}"
            )
        cfg = resumed_config(
            state["config"], a.resume, a, p, lambda name: name in ("device", "rounds")
        )
        status = run_or_stop(cfg, Extensions(), True, "python train.py")
        return status if isinstance(status, int) else 0
    return train_seeds(config_from_args(a, p), seeds_of(a), overwrite=a.overwrite)


def add_command_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the command that are not settings of the run."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="OUT",
                   help="continue the run whose state OUT/state.pt holds (a seed's folder), with "
                        "its own settings (--device and a larger --rounds may be given)")
    group.add_argument("--overwrite", action="store_true",
                   help="train again the seeds whose folders (OUT/seed-S) hold a finished run, or "
                        "a run of other settings (without it such a folder is refused)")


if __name__ == "__main__":
    sys.exit(main())
