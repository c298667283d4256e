"""One training run, top to bottom: settings -> data -> model and clients -> rounds -> result.

`train.py` is its command line; `experiments.py` runs the same function with other pieces
passed in (`Extensions`: another loss, fully labelled data, robust aggregation, absent
clients). Every mode gets the same budget: nodes x rounds x local steps optimiser steps.

The state is saved between rounds (`state.pt`), so a killed run resumes bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import fl
import segviz
from common import fail, save_torch_atomic, write_json_atomic
from config import EVAL_OVERLAP, PRESETS, Config, Preset, data_config, preset_of, run_name, validates
from data import (
    NODE_SITES,
    ORGAN_ID,
    DataError,
    PatchSampler,
    SamplerConfig,
    load_federation,
    load_validation,
    phantom_spec,
    round_robin,
    site_sampler,
    site_windows,
)
from eval import (
    CHECKPOINT_FORMAT,
    across_seeds,
    evaluate,
    format_metric_tables,
    format_table,
    model_from_checkpoint,
    primary_scoring,
    scored_metrics,
)
from unet3d import UNet3D, UNetConfig

# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_dice(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - Dice per sample and class (background included), averaged over both."""
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
# What experiments.py may change: functions passed in (train.py uses the defaults)
# ---------------------------------------------------------------------------------------

# a client's loss from the sites its batches come from and which of them gave the last batch
LossFor = Callable[[Config, Sequence[str], Callable[[], int]], Loss]


@dataclass
class Extensions:
    """What experiments.py changes in a run (variants.py); train.py passes the defaults."""

    stem: str = ""  # the run's name in place of the mode, e.g. "oracle" or "fedavg-marginal"
    settings: dict = field(default_factory=dict)  # saved with the run; experiments.py rebuilds from them
    loss: LossFor | None = None  # default: LOSSES[cfg.loss]
    full_labels: bool = False  # every organ labelled at every site (phantom only: the oracle)
    combine: fl.Combine = fl.mean
    weighted: bool = False  # weight the average by each site's number of cases
    present: Callable[[list[fl.Client]], list[fl.Client]] | None = None  # who takes part in a round
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # their random state, saved


# ---------------------------------------------------------------------------------------
# Building the federation
# ---------------------------------------------------------------------------------------


def seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass
class Run:
    """Everything a training run holds between rounds (plain data; saved whole between rounds)."""

    cfg: Config
    sites: tuple[str, ...]
    organs: list[str]
    unet_cfg: UNetConfig
    model: UNet3D
    optimizer: torch.optim.Optimizer
    clients: list[fl.Client]
    samplers: dict[str, PatchSampler]
    pooled: object | None  # the central model's round-robin batch source (its position is state)
    keys: list[str]  # the shared state-dict keys
    local_steps: dict[str, int]  # optimiser steps per round of each client
    ext: Extensions
    log: list[str] = field(default_factory=list)  # absences and refused updates, one line each
    norms: list[dict[str, float]] = field(default_factory=list)  # per round: each client's update norm
    validation: list[dict] = field(default_factory=list)  # {"round": r, site: validation Dice}
    best: dict | None = None  # keep="best": {"round", "score", "states"} of the best validation so far
    earlier_seconds: float = 0.0  # training time of the processes before a resume
    starts: int = 1
    started: float = field(default_factory=time.time)


def build_run(cfg: Config, train_cases: dict, ext: Extensions, only: Sequence[str] | None = None) -> Run:
    """The federation at round 0: samplers, one live model, clients as plain data.

    `only`: samplers and clients for these sites alone (a Flower node holds one site's data, the
    server none); the model, organs and shared keys stay the whole federation's."""
    preset = preset_of(cfg)
    sites = NODE_SITES[cfg.nodes]
    organs = [s for s in ORGAN_ID if s in sites]  # sites and organs coincide in order
    binary = cfg.mode in segviz.BINARY
    windows = site_windows(sites, binary)
    unet_cfg = UNetConfig(classes=2 if binary else len(organs) + 1, channels=cfg.channels, norm=cfg.norm,
                          task_stages=cfg.task_stages)
    sampler_cfg = SamplerConfig(patch=preset.patch, volumes_per_batch=preset.volumes_per_batch,
                                patches_per_volume=preset.patches_per_volume, p_spatial=preset.p_affine,
                                p_intensity=preset.p_intensity)
    local = sites if only is None else tuple(only)
    samplers = {s: site_sampler(train_cases[s], windows[s], binary, sampler_cfg, cfg.device, seed_for(cfg.seed, s),
                                len(organs)) for s in local}
    # channels-last: the layout Tensor Cores want (on a CPU the top unit is channels-last either way)
    model = UNet3D(unet_cfg).to(cfg.device, memory_format=torch.channels_last_3d)
    # foreach: the per-tensor loop's arithmetic (bitwise, on a CPU) in a third less time
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)
    # one live model trains; every client is only its stored state, on the device if all fit
    store = fl.choose_store(torch.device(cfg.device), len(sites), fl.state_bytes(model))
    loss_for = ext.loss or (lambda cfg, sources, which: LOSSES[cfg.loss])
    pooled = None
    if cfg.mode == "central":
        pooled = round_robin([samplers[s] for s in sites])
        loss = loss_for(cfg, sites, lambda: (pooled.position[0] - 1) % len(sites))
        clients = [fl.new_client("pooled", model, optimizer, on_device(pooled, cfg.device), loss, store=store)]
        local_steps, keys = {"pooled": sum(steps_per_round(cfg, len(train_cases[s])) for s in sites)}, []
    else:
        clients = [fl.new_client(s, model, optimizer, on_device(samplers[s].sample, cfg.device),
                                 loss_for(cfg, [s], lambda: 0), weight=len(train_cases[s]), store=store)
                   for s in local]
        local_steps = {s: steps_per_round(cfg, len(train_cases[s])) for s in local}
        keys = exchanged_keys(model, cfg.mode, cfg.fedbn, preset.share_buffers)
    return Run(cfg, sites, organs, unet_cfg, model, optimizer, clients, samplers, pooled, keys, local_steps, ext)


def exchanged_keys(model: torch.nn.Module, mode: str, fedbn: bool, share_buffers: bool) -> list[str]:
    """The keys each site sends per round. Without `share_buffers`, parameters only: the original
    averaged named_parameters(), so normalisation statistics (buffers) stayed local."""
    parameters = None if share_buffers else {k for k, _ in model.named_parameters()}
    return segviz.shared_keys(model.state_dict(), mode, fedbn, parameters)


def on_device(next_batch: Callable[[], fl.Batch], device: torch.device | str) -> Callable[[], fl.Batch]:
    """The sampler's batches on the training device, in the model's memory layout."""
    def batch():
        x, y = next_batch()
        return x.to(device).contiguous(memory_format=torch.channels_last_3d), y.to(device)
    return batch


def steps_per_round(cfg: Config, cases: int) -> int:
    """A site's local work per round: local_steps, or the preset's epochs of the site's own
    data, an epoch being one pass of batches over its cases (as the original's 10 epochs)."""
    return cfg.local_steps or preset_of(cfg).local_epochs * epoch_steps(cfg, cases)


def epoch_steps(cfg: Config, cases: int) -> int:
    return math.ceil(cases / preset_of(cfg).volumes_per_batch)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def train(cfg: Config, ext: Extensions | None = None, resume: bool = False) -> dict:
    """Run one setup end to end; returns the metrics (also written to cfg.out)."""
    ext = ext or Extensions()
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    dc = data_config(cfg)
    try:
        train_cases, test_cases, data_info = load_federation(NODE_SITES[cfg.nodes], dc, cfg.seed,
                                                             ext.full_labels)
        val_cases = load_validation(NODE_SITES[cfg.nodes], dc, cfg.seed) if validates(cfg) else {}
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
    if cfg.finetune_epochs and cfg.mode in segviz.BINARY:
        finetune_heads(run, val_cases, cfg.finetune_epochs)
    return finish(run, test_cases, data_info, (t_start, t_data, time.time()))


def rounds_loop(run: Run, val_cases: dict, start: int) -> None:
    """The federated rounds: local training, the shared keys combined, validation, state saved."""
    cfg, preset = run.cfg, preset_of(run.cfg)
    every = cfg.val_every or (1 if preset.keep == "best" else 0)
    steps = sum(run.local_steps.values())
    print(f"{run_name(cfg, run.ext.stem)} seed {cfg.seed}: {len(run.sites)} site(s) {', '.join(run.sites)} | "
          f"{cfg.rounds} rounds x {'/'.join(map(str, run.local_steps.values()))} local steps | batch "
          f"{run.samplers[run.sites[0]].cfg.batch} x {preset.patch} | {exchange_summary(run)} | device {cfg.device}")
    bar = tqdm(total=cfg.rounds * steps, initial=start * steps, desc="train", unit="step", disable=None,
               dynamic_ncols=True)
    saved_at, save_seconds = time.monotonic(), 0.0
    for r in range(start, cfg.rounds):
        present = run.ext.present(run.clients) if run.ext.present else run.clients
        report = fl.federated_round(run.model, run.optimizer, run.clients, run.local_steps, run.keys,
                                    run.ext.combine, run.ext.weighted, bar.update, present)
        bar.update(sum(run.local_steps[name] for name in report.absent))
        line = f"round {r + 1:>3}/{cfg.rounds}  loss " + "  ".join(f"{k} {v:.3f}" for k, v in report.losses.items())
        events = [f"absent: {', '.join(report.absent)}"] if report.absent else []
        events += [f"refused {name}: {why}" for name, why in report.refused.items()]
        run.log += [f"round {r + 1}: {e}" for e in events]
        run.norms.append({k: round(v, 6) for k, v in report.norms.items()})
        if every and ((r + 1) % every == 0 or r + 1 == cfg.rounds):
            scores = validate(run, val_cases)
            run.validation.append({"round": r + 1, **scores})
            if preset.keep == "best":
                keep_if_best(run, scores, r + 1)
            line += "  | validation " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        bar.write(line + ("  | " + "; ".join(events) if events else ""))
        if r + 1 == cfg.rounds or time.monotonic() - saved_at >= SAVE_SPACING * save_seconds:
            t = time.monotonic()
            save_state(run, r + 1)
            saved_at, save_seconds = time.monotonic(), time.monotonic() - t
    bar.close()


def exchange_summary(run: Run) -> str:
    """What leaves each site per round, measured on the tensors that are sent."""
    state = run.clients[0].model_state
    sent = sum(state[k].numel() * state[k].element_size() for k in run.keys)
    return f"{len(run.keys)}/{len(state)} keys shared | {sent / 1e6:.2f} MB up and down per site per round"


def validate(run: Run, val_cases: dict[str, list], sites: Sequence[str] | None = None) -> dict[str, float]:
    """Mean Dice of each site's organ on that site's validation cases, by the model the site
    holds now (its own binary model, or the one multi-class model), through the site's window."""
    cfg, preset = run.cfg, preset_of(run.cfg)
    windows = site_windows(run.sites, cfg.mode in segviz.BINARY)
    out = {}
    with torch.random.fork_rng(devices=[]):  # building models must not move the training RNG
        for site in sites or run.sites:
            if not val_cases.get(site):  # a site too small to hold a case out
                continue
            binary = cfg.mode in segviz.BINARY
            state = next(c for c in run.clients if c.name == site).model_state if binary else \
                run.clients[0].model_state
            net = segviz.site_model(run.unet_cfg, cfg.mode, site, state, windows[site])
            organs = [site] if binary else run.organs
            dice = evaluate(net, val_cases[site], organs, preset.roi or preset.patch, cfg.device, EVAL_OVERLAP,
                            preset.blend, cfg.largest, surface=False)
            out[site] = round(float(np.mean(dice["heads" if len(organs) == 1 else "classes"]["dice"][site])), 6)
    return out


def keep_if_best(run: Run, scores: dict[str, float], rounds_done: int) -> None:
    """keep="best": remember every client's state at the round of the best mean validation Dice."""
    if not scores:
        return
    score = float(np.mean(list(scores.values())))
    if run.best is None or score > run.best["score"]:
        run.best = {"round": rounds_done, "score": score,
                    "states": {c.name: {k: v.clone() for k, v in c.model_state.items()} for c in run.clients}}


def finetune_heads(run: Run, val_cases: dict[str, list], epochs: int) -> None:
    """After federation, each site trains its task block alone (representation frozen) for
    `epochs` of its data, keeping the head of its best validation Dice, as the original's last
    stage. Frozen weights do not move (Adam skips them); running statistics do, in training
    mode: local ones keep moving, as the original's; shared ones are put back every epoch."""
    for name, p in run.model.named_parameters():
        p.requires_grad_(name.startswith(segviz.TASK_PREFIX))
    for client in tqdm(run.clients, desc="fine-tune heads", disable=None):
        def score(site: str = client.name) -> float:  # without validation cases the last epoch is kept
            return validate(run, val_cases, [site]).get(site, -1.0)

        shared = {k: client.model_state[k] for k in run.keys}
        best = (score(), client.model_state)
        for _ in range(epochs):
            fl.local_train(run.model, run.optimizer, client, epoch_steps(run.cfg, len(run.samplers[client.name])))
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

STATE_FILE = "state.pt"
# state.pt (tens of MB): after the first and last round, else once training since the last save took 50 times it
SAVE_SPACING = 50
STATE_FORMAT = "segviz-state/3"  # /3: the config dataclass; /2 held train.py's flags one by one


def save_state(run: Run, rounds_done: int) -> None:
    """state.pt: everything the run needs to go on after `rounds_done` rounds."""
    blob = {"format": STATE_FORMAT, "round": rounds_done, "config": saved_config(run.cfg),
            "extensions": run.ext.settings, "log": run.log, "norms": run.norms, "validation": run.validation,
            "clients": [{"name": c.name, "model_state": c.model_state, "optim_state": c.optim_state,
                         "history": c.history} for c in run.clients],
            "generators": {**{f"sampler/{s}": sm.gen.get_state() for s, sm in run.samplers.items()},
                           **{k: g.get_state() for k, g in run.ext.generators.items()},
                           "torch": torch.get_rng_state()},
            "pooled_position": run.pooled.position[0] if run.pooled is not None else 0,
            "train_seconds": run.earlier_seconds + time.time() - run.started, "starts": run.starts, "best": run.best,
            "recipe": recipe(preset_of(run.cfg))}
    os.makedirs(run.cfg.out, exist_ok=True)
    save_torch_atomic(blob, os.path.join(run.cfg.out, STATE_FILE))


def recipe(preset: Preset) -> dict:
    """What a state was trained with beyond its config: the preset's patch and augmentation
    (a resumed run must go on with the same, whichever version resumes it)."""
    return {"patch": list(preset.patch), "p_affine": preset.p_affine, "p_intensity": preset.p_intensity}


def saved_config(cfg: Config) -> dict:
    """The config as plain data, without where the run happens to be (device, out folder)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k not in ("device", "out")}


def load_state(path: str) -> dict:
    """A training state written by save_state, loaded without unpickling code."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"{path}: no such file (nothing to resume)")
    except Exception as e:  # truncated, not a torch file
        fail(f"{path}: cannot be read ({type(e).__name__}); not a complete training state")
    if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT:
        fail(f"{path}: not a training state written by this version of train.py")
    return blob


def restore_state(run: Run, path: str) -> int:
    """Put a saved state back into a freshly built run; returns the rounds already done."""
    blob = load_state(path)
    saved, now = blob.get("recipe"), recipe(preset_of(run.cfg))
    if saved is None:  # a state from before the recipe was recorded: the preset's, perhaps another patch
        saved = recipe(PRESETS[run.cfg.preset]) | ({"patch": blob["patch"]} if "patch" in blob else {})
    if saved != now:
        fail(f"{path}: trained with {saved}, where this version uses {now}; finish it with the version that "
             f"started it")
    if [c["name"] for c in blob["clients"]] != [c.name for c in run.clients]:
        fail(f"{path}: its clients differ from this run's {[c.name for c in run.clients]}")
    for client, saved in zip(run.clients, blob["clients"]):
        shapes = {k: tuple(v.shape) for k, v in saved["model_state"].items()}
        if shapes != {k: tuple(v.shape) for k, v in client.model_state.items()}:
            fail(f"{path}: client {client.name}'s weights do not fit this run's model")
        device = next(iter(client.model_state.values())).device
        client.model_state = {k: v.to(device) for k, v in saved["model_state"].items()}
        client.optim_state, client.history = saved["optim_state"], saved["history"]
    gens = {**{f"sampler/{s}": sm.gen for s, sm in run.samplers.items()}, **run.ext.generators}
    if missing := sorted(set(gens) - set(blob["generators"])):
        fail(f"{path}: no saved random state for {', '.join(missing)}")
    for name, g in gens.items():
        g.set_state(blob["generators"][name])
    torch.set_rng_state(blob["generators"]["torch"])
    if run.pooled is not None:
        run.pooled.position[0] = blob["pooled_position"]
    run.log, run.norms, run.validation, run.best = blob["log"], blob["norms"], blob["validation"], blob["best"]
    run.earlier_seconds, run.starts = float(blob["train_seconds"]), int(blob["starts"]) + 1
    print(f"resuming {path} after round {blob['round']}/{run.cfg.rounds}")
    return int(blob["round"])


# ---------------------------------------------------------------------------------------
# The result: the final model, tested, saved
# ---------------------------------------------------------------------------------------


def final_checkpoint(run: Run, name: str, data_info: dict) -> dict:
    """model.pt: each site's model (single, segviz) or the one global model, with the config
    (`data_info`: where the cases came from, as load_federation says)."""
    cfg, preset = run.cfg, preset_of(run.cfg)
    binary = cfg.mode in segviz.BINARY
    rep_keys = [k for k in run.clients[0].model_state if k.startswith(segviz.REP_PREFIX)]
    config = {**saved_config(cfg), "local_steps": run.local_steps, "unet": run.unet_cfg.to_dict(),
              # one representation pass serves every head only where the sites share all of it
              "shared_rep": cfg.mode == "segviz" and set(rep_keys) <= set(run.keys), "shared_keys": len(run.keys),
              **recipe(preset), "roi": list(preset.roi or preset.patch), "blend": preset.blend,
              "eval_overlap": EVAL_OVERLAP, "batch": run.samplers[run.sites[0]].cfg.batch,
              "windows": {k: list(v) for k, v in site_windows(run.sites, binary).items()},
              "source": data_info, "phantom_cases": dict(phantom_spec(data_config(cfg)).cases),
              "extensions": run.ext.settings}
    states = {c.name: c.model_state for c in run.clients} if binary else {"global": run.clients[0].model_state}
    return {"format": CHECKPOINT_FORMAT, "name": name, "mode": cfg.mode, "nodes": cfg.nodes, "organs": run.organs,
            "config": config, "states": states}


def finish(run: Run, test_cases: list, data_info: dict, times: tuple[float, float, float]) -> dict:
    """Test the final model, write model.pt and metrics.json, print the summary."""
    cfg, preset = run.cfg, preset_of(run.cfg)
    t_start, t_data, t_trained = times
    name = run_name(cfg, run.ext.stem)
    ckpt = final_checkpoint(run, name, data_info)
    primary = primary_scoring(cfg.mode)
    per_case = evaluate(model_from_checkpoint(ckpt), test_cases, run.organs, ckpt["config"]["roi"], cfg.device,
                        EVAL_OVERLAP, preset.blend, cfg.largest, primary=primary) if cfg.test else {}
    scored = scored_metrics(per_case, primary)
    t_end = time.time()
    train_seconds = run.earlier_seconds + t_trained - t_data  # a resumed run counts its earlier processes
    seconds = t_end - t_start + run.earlier_seconds
    metrics = {"name": name, "mode": cfg.mode, "nodes": cfg.nodes, "seed": cfg.seed, "organs": run.organs, **scored,
               "seconds": round(seconds, 1), "data_seconds": round(t_data - t_start, 1),
               "train_seconds": round(train_seconds, 1), "starts": run.starts, "config": ckpt["config"],
               "device": str(cfg.device), "losses": {c.name: c.history for c in run.clients}, "events": run.log,
               "update_norms": run.norms, "validation": run.validation}
    os.makedirs(cfg.out, exist_ok=True)
    save_torch_atomic(ckpt, os.path.join(cfg.out, "model.pt"))
    write_json_atomic(os.path.join(cfg.out, "metrics.json"), metrics)
    print()
    if by := scored["by_scoring"]:
        print(format_metric_tables({f"{name} ({k})" if len(by) > 1 else name: v for k, v in by.items()}, run.organs))
    if run.validation:
        print("validation Dice (own site's cases, last check): " + "  ".join(
            f"{k} {v:.3f}" for k, v in run.validation[-1].items() if k != "round"))
    if run.log:
        print(f"{len(run.log)} event(s): " + "; ".join(run.log[-5:]) + (" ..." if len(run.log) > 5 else ""))
    resumed = f", over {run.starts} starts" if run.starts > 1 else ""
    print(f"\n{name} seed {cfg.seed}: {seconds:.0f} s in all ({t_data - t_start:.0f} s data, {train_seconds:.0f} s "
          f"training{resumed}, {t_end - t_trained:.0f} s test) on {cfg.device}; "
          f"checkpoint {os.path.join(cfg.out, 'model.pt')}")
    return metrics


def train_seeds(cfg: Config, seeds: Sequence[int], resume: bool = False,
                ext_for: Callable[[Config], Extensions] | None = None, command: str = "python train.py") -> int:
    """Train each seed (in OUT/seed-S when there are several), then the mean ± std across them.
    `ext_for(cfg)`: experiments.py's extensions for a seed's config; `command`: the script that
    resumes a run (named when Ctrl-C stops it). Returns the exit status."""
    results = {}
    try:
        for seed in seeds:
            seed_cfg = replace(cfg, seed=seed, out=os.path.join(cfg.out, f"seed-{seed}") if len(seeds) > 1 else cfg.out)
            results[seed] = train(seed_cfg, ext_for(seed_cfg) if ext_for else Extensions(), resume)
    except KeyboardInterrupt:
        state = os.path.join(seed_cfg.out, STATE_FILE)
        if os.path.exists(state):
            print(f"\ninterrupted; the last saved state is in {state}: "
                  f"{command} --resume {seed_cfg.out}", file=sys.stderr)
        else:
            print("\ninterrupted before the first round ended; nothing to resume", file=sys.stderr)
        return 130
    if len(results) > 1 and cfg.test:
        first = next(iter(results.values()))
        rows = {f"seed {seed}": m["dice"] for seed, m in results.items()}
        rows[f"mean of {len(results)} seeds"] = {o: across_seeds(list(rows.values()), o) for o in first["organs"]}
        print(f"\n{first['name']}, {len(results)} seeds (within a seed: mean ± std over test cases; last row: "
              f"mean ± std over seeds of each seed's mean)")
        print(format_table(rows, first["organs"]))
    return 0
