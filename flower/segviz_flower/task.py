"""What the ServerApp and the ClientApp share: the run config read as train.py's settings (a
`settings.Config`, one run-config key per field) plus the aggregation variants, the settings'
fingerprint, tensors on the wire, and a site's training as `train.build_run` builds it, kept
prepared between messages.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, RecordDict

import fl
import train
from cases import phantom_spec
from data import NODE_SITES, Case, DataError
from experiments import robust
from phantom import phantom_federation
from segviz import MODES
from settings import Config, add_arguments, config_from_args, default_cache, flag_of, is_real, saved

State = fl.State
# modes without pooled data (central pools every site's images)
FEDERATED = ("segviz", "fedavg", "single")
SITES = NODE_SITES[4]  # a simulated node without `site` takes SITES[partition-id]

# ---------------------------------------------------------------------------------------
# The run config: one key per Config field, the variants of experiments train, the server's keys
# ---------------------------------------------------------------------------------------

# run-config keys of the Config fields: their flags' names (`local-steps`, `seeds`)
SETTING_KEYS = {flag_of(f)[2:]: f.name for f in fields(Config)}
# robust aggregation, absences and DP: experiments train's variant flags of the same names
VARIANTS = {
    "weighted": False,
    "dropout": 0.0,
    "aggregate": "mean",
    "max-update-norm": 0.0,
    "norm-factor": 0.0,
    "dp-clip": 0.0,
    "dp-noise": 0.0,
}
# the server's own: where its results go is `out`; these say how it runs the exchange
SERVER_KEYS = {"keep-heads-local": False, "resume": False, "timeout": 600, "wait-for-nodes": 300}
# settings that may differ between the machines of one run (paths, devices) or grow on resume
MACHINE_SETTINGS = {"cache", "data_root", "data", "rounds", "out", "device"}


def train_argv(run_config: Mapping) -> list[str]:
    """The train.py command line that the run config's setting keys stand for. TOML has no null:
    "" means "not given" (the preset's value). A sequence is written "16,32,64" or "64 64 32"; a
    dataset "SITE=PATH", several separated by commas."""
    argv: list[str] = []
    for key in SETTING_KEYS:
        value = run_config.get(key, "")
        if value == "":
            continue
        flag = f"--{key}"
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{key}")
        elif key == "data":
            argv += [a for item in str(value).split(",") if item for a in (flag, item.strip())]
        elif key in ("spacing", "patch", "roi", "seeds"):
            argv += [flag, *str(value).replace(",", " ").split()]
        else:
            argv += [flag, str(value)]
    return argv


def config_from(run_config: Mapping, *, out: str, cache: str, device: str, data_root: str = "",
                data: str = "") -> Config:
    """The run's Config as train.py parses and checks it, with this machine's paths and device;
    a refused setting raises ValueError (argparse has printed why)."""
    p = argparse.ArgumentParser(prog="flower run config", exit_on_error=False)
    add_arguments(p)
    machine = {
        "out": out,
        "cache": cache or default_cache(),
        "device": device,
        "data-root": data_root,
        "data": data,
    }
    argv = train_argv({**run_config, **machine})
    try:
        cfg = config_from_args(p.parse_args(argv), p, check_out=False)
    except (SystemExit, argparse.ArgumentError) as e:
        raise ValueError(f"train.py refuses these settings: {' '.join(argv)}") from e
    if cfg.mode not in FEDERATED:
        raise ValueError(f"mode {cfg.mode!r} pools every site's data and cannot run over Flower; "
                         f"use one of {', '.join(FEDERATED)}")
    return cfg


def variant_of(run_config: Mapping) -> dict:
    """The aggregation variant (VARIANTS' keys), checked as experiments.py train checks them."""
    v = {k: type(default)(run_config.get(k, default)) for k, default in VARIANTS.items()}
    checks = [
        (not 0 <= v["dropout"] < 1, "dropout must be in [0, 1)"),
        (
            v["aggregate"] not in robust.AGGREGATORS,
            f"aggregate: one of {', '.join(robust.AGGREGATORS)}",
        ),
        (
            min(v["max-update-norm"], v["norm-factor"], v["dp-clip"], v["dp-noise"]) < 0,
            "negative limit",
        ),
        (v["dp-noise"] > 0 and not v["dp-clip"], "dp-noise needs dp-clip"),
    ]
    for bad, why in checks:
        if bad:
            raise ValueError(f"run config: {why}")
    return v


def settings_key(cfg: Config, v: dict) -> str:
    """A fingerprint of what defines the training (not paths or devices): the server and every
    node must agree on it, and a resumed run must match the state it resumes."""
    settings = {k: val for k, val in saved(cfg).items() if k not in MACHINE_SETTINGS}
    settings |= {"real": is_real(cfg), "variant": v}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_label(run_config: Mapping) -> str:
    """The run's name on the nodes' disks: the last part of the server's out folder."""
    return os.path.basename(os.path.normpath(str(run_config.get("out") or "runs/flower")))


# ---------------------------------------------------------------------------------------
# Tensors on the wire and in the node's state
# ---------------------------------------------------------------------------------------


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as Flower arrays (NumPy on the wire: exact, dtype and shape kept)."""
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord) -> State:
    """The state dict back from Flower arrays, in the record's key order."""
    # np.array copies: the arrays Flower decodes are read-only views of the message bytes
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}


def array_keys(content: RecordDict) -> list[str]:
    """Every array key a message carries, in any of its records: what it lets leave a site."""
    return sorted(k for record in content.array_records.values() for k in record)


def to_bytes(obj: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def local_keys(state: Mapping[str, torch.Tensor], shared: list[str]) -> list[str]:
    """The keys a site keeps during the rounds and sends once at the end (its task block; with
    FedBN also its normalisation layers; nothing in fedavg)."""
    return [k for k in state if k not in set(shared)]


# ---------------------------------------------------------------------------------------
# A node's site, prepared once per process
# ---------------------------------------------------------------------------------------


@dataclass
class Site:
    """A SuperNode's site as train.build_run builds it: its client, live model and sampler,
    and the round-0 state every message starts from unless the node's state says otherwise."""

    name: str
    cfg: Config
    key: str  # settings_key
    run: train.Run
    folder: str  # on this node: state files for resuming, and a kept head
    initial: dict  # model and optimiser state and sampler random state at round 0

    @property
    def client(self) -> fl.Client:
        return self.run.clients[0]

    def reset(self) -> None:
        """Back to round 0 (a message must not see what an earlier one trained)."""
        self.client.model_state = {k: v.clone() for k, v in self.initial["model"].items()}
        self.client.optim_state = fl.stored(self.initial["optim"], "cpu")
        self.run.samplers[self.name].gen.set_state(self.initial["sampler"])
        if self.client.scaler is not None:  # float16 --amp: the scale starts afresh too
            device = next(self.run.model.parameters()).device
            self.client.scaler = torch.amp.GradScaler(device.type)


# A Flower simulation runs every message of a node in one long-lived process, and a SuperNode
# that keeps its ClientApp process would too: loading and windowing the site's volumes and
# building the sampler then happens once per run instead of once per message.
PREPARED: dict[tuple, Site] = {}


def simulated(node_config: Mapping) -> bool:
    """A node of Flower's simulation: a partition-id and no `site` in its node config."""
    return "site" not in node_config and "partition-id" in node_config


def simulation_size(node_config: Mapping) -> int:
    """How many SuperNodes Flower's simulation has (its num-partitions); 0 on a real SuperNode."""
    return int(node_config.get("num-partitions", 0)) if simulated(node_config) else 0


def simulation_sites(run_config: Mapping, supernodes: int) -> int:
    """The sites a simulation of `supernodes` SuperNodes trains: the run's `nodes`, one site per
    SuperNode at most (Flower's default simulation has 2 SuperNodes, the run 4 sites)."""
    return max(1, min(int(run_config.get("nodes", len(SITES))), supernodes))


def site_of(context: Context) -> str:
    """This node's site: `site` in its node config, else (Flower's simulation) its partition-id."""
    node = context.node_config
    if "site" in node:
        return str(node["site"])
    if "partition-id" in node:
        pid = int(node["partition-id"])
        if not 0 <= pid < len(SITES):
            raise ValueError(
                f"partition-id {pid}: a simulated federation has at most {len(SITES)} sites"
            )
        return SITES[pid]
    raise ValueError("this SuperNode's node config has no site: --node-config \"site='liver'\"")


def node_paths(node: Mapping, run_config: Mapping, site: str) -> dict[str, str]:
    """Where this node reads its data and keeps its cache. A real SuperNode says so in its node
    config; a simulated one runs on the machine that started the run, so the run config's paths
    (the server's) are its own too."""
    if simulated(node):
        keys = ("data-root", "data", "cache")
        return {k.replace("-", "_"): str(run_config.get(k, "")) for k in keys}
    data_root = str(node.get("data-root", ""))
    if bool(data_root) != bool(run_config.get("data-root", "")):
        raise ValueError(
            f"site {site}: data-root {data_root!r} on this node but data-root "
            f"{run_config.get('data-root', '')!r} in the run: real data everywhere or the "
            "phantom everywhere"
        )
    return {"data_root": data_root, "data": "", "cache": str(node.get("cache", ""))}


def node_folder(node: Mapping, run_config: Mapping) -> str:
    """Where this node keeps its state files (and a kept head) for this run: the run's folder
    under its node config's `out`; a simulated node, on the machine of the run, keeps them
    with the run's results, in the run config's `out` (sites/)."""
    if simulated(node):
        return os.path.join(os.path.abspath(str(run_config.get("out") or "runs/flower")), "sites")
    return os.path.join(
        os.path.abspath(str(node.get("out", "runs/flower-node"))), run_label(run_config)
    )


def node_settings(context: Context) -> tuple[str, Config, dict, str]:
    """This node's site, the run's Config with this node's paths and device (in a simulation, as
    many sites as it has SuperNodes), the variant, and the node's folder for this run."""
    node, run_config = context.node_config, context.run_config
    site = site_of(context)
    if supernodes := simulation_size(node):
        run_config = {**run_config, "nodes": simulation_sites(run_config, supernodes)}
    if threads := int(node.get("threads", 0)):
        torch.set_num_threads(threads)
    folder = node_folder(node, run_config)
    cfg = config_from(
        run_config,
        out=folder,
        device=str(node.get("device", "auto")),
        **node_paths(node, run_config, site),
    )
    return site, cfg, variant_of(run_config), folder


def open_site(context: Context) -> Site:
    """This node's site, built on the process's first message of the run and reset to round 0
    on every later one (the caller restores the node's state after that)."""
    t0 = time.time()
    name, cfg, v, folder = node_settings(context)
    if name not in NODE_SITES[cfg.nodes]:
        raise ValueError(f"site {name!r}: not one of {NODE_SITES[cfg.nodes]} (nodes={cfg.nodes})")
    key = settings_key(cfg, v)
    slot = (context.run_id, context.node_id, name, key, cfg.cache, cfg.data_root, cfg.device)
    if (site := PREPARED.get(slot)) is not None:
        site.reset()
        return site
    cases = site_cases(cfg, name)
    # the initial weights train.py draws after seeding with the run's seed
    torch.manual_seed(cfg.seed)
    run = train.build_run(cfg, {name: cases}, train.Extensions(), only=(name,))
    client = run.clients[0]
    initial = {
        "model": {k: v.clone() for k, v in client.model_state.items()},
        "optim": fl.stored(client.optim_state, "cpu"),
        "sampler": run.samplers[name].gen.get_state(),
    }
    site = PREPARED[slot] = Site(name, cfg, key, run, folder, initial)
    print(f"site {name}: prepared in {time.time() - t0:.1f} s (process {os.getpid()})", flush=True)
    return site


def site_cases(cfg: Config, site: str) -> list[Case]:
    """This site's training cases: the phantom's, or its own dataset under data-root (its
    training split; the test set stays with the server)."""
    try:
        if not is_real(cfg):  # this site's phantom cases alone
            return phantom_federation((site,), cfg.seed, phantom_spec(cfg), cfg.cache)[0][site]
        from realdata.archives import find_sources
        from realdata.federation import site_split
        from realdata.preprocess import check_labelled, load_source

        source, _, _ = site_split(find_sources((site,), cfg.data_root, cfg.data)[site], cfg)
        cases = load_source(
            source, cfg.spacing, cfg.cache, min(4, os.cpu_count() or 1), cfg.max_cases
        )
        check_labelled(cases, source)
        return cases
    except DataError as e:
        raise ValueError(f"site {site}: {e}") from None


def binary(cfg: Config) -> bool:
    return MODES[cfg.mode].binary
