"""The ClientApp: one site per SuperNode (its `site` node config, or in Flower's simulation
its partition-id: 0 liver, 1 spleen, 2 pancreas, 3 kidneys; a simulation trains one site per
simulated SuperNode, up to the run's `nodes`).

A round of local training is `fl.local_train` on the very client that `train.build_run`
builds for the in-process loop: same sampler seed, same initial weights from the run's seed,
same Adam, learning rate and loss. What never leaves the site (the task block, Adam's moments,
the sampler's random state) stays in the node's Context.state between rounds, and in a file
on the node for resuming.
"""

from __future__ import annotations

import glob
import os
import re

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fl
from common import save_torch_atomic
from data import NODE_SITES, site_windows

from .task import (
    Site,
    binary,
    from_bytes,
    from_record,
    local_keys,
    node_settings,
    open_site,
    simulation_size,
    to_bytes,
    to_record,
)

NODE_FORMAT = "segviz-flower-node/2"


def state_file(site: Site, tag: str, round_: int) -> str:
    return os.path.join(site.folder, f"{site.name}-{tag}-r{round_:05d}.pt")


def state_files(site: Site, tag: str) -> list[str]:
    """This site's state files of one run series, oldest round first."""
    return sorted(glob.glob(os.path.join(glob.escape(site.folder), f"{site.name}-{tag}-r*.pt")))


def file_round(path: str) -> int:
    return int(re.search(r"-r(\d+)\.pt$", path).group(1))


def keep_state(site: Site, context: Context, round_: int, tag: str, counted: int) -> None:
    """Store what stays on the node after training round `round_`: in Context.state for the next
    message of this run, and in a file for a resumed run (a new Flower run starts with an empty
    Context) or a restarted SuperNode. `counted`: the site's last round the server received."""
    local = {
        k: site.client.model_state[k] for k in local_keys(site.client.model_state, site.run.keys)
    }
    # Adam's state is nested (per-parameter moments and step counts, param groups with tuples),
    # so it travels as torch.save bytes, read back with weights_only=True
    rest = {
        "optim": site.client.optim_state,
        "sampler": site.run.samplers[site.name].gen.get_state(),
        "scaler": site.client.scaler and site.client.scaler.state_dict(),  # float16 --amp only
    }
    context.state["local"] = to_record(local)
    context.state["node"] = ConfigRecord({"round": round_, "tag": tag, "rest": to_bytes(rest)})
    os.makedirs(site.folder, exist_ok=True)
    blob = {
        "format": NODE_FORMAT,
        "site": site.name,
        "tag": tag,
        "round": round_,
        "settings": site.key,
        "local": local,
        "rest": rest,
    }
    save_torch_atomic(blob, state_file(site, tag, round_))
    # rounds trained after `counted` and before this one never reached the server: rolled back.
    # Of the rest keep this round's file and the newest earlier one (the state to go back to if
    # this round's reply is lost too)
    for path in state_files(site, tag):
        if counted < file_round(path) < round_:
            os.remove(path)
    for old in state_files(site, tag)[:-2]:
        os.remove(old)


def restore_state(site: Site, context: Context, counted: int, tag: str) -> int:
    """Put back the node's state after round `counted`, the last round whose reply the server
    received from this site (or after its last round before that, if it sat some out): training
    that never reached the server is undone, as an absent client does not train in-process.
    Returns that round; 0 when the site starts from the seed's weights."""
    node = context.state.config_records.get("node")
    if node is not None and node["tag"] == tag and int(node["round"]) <= counted:
        local, rest, done = (
            from_record(context.state["local"]),
            from_bytes(node["rest"]),
            int(node["round"]),
        )
    else:
        blob = newest_state(site, tag, counted)
        if blob is None:
            return 0
        local, rest, done = blob["local"], blob["rest"], int(blob["round"])
    store = next(iter(site.client.model_state.values())).device
    site.client.model_state.update({k: v.to(store) for k, v in local.items()})
    site.client.optim_state = fl.stored(rest["optim"], store)
    if site.client.scaler is not None and rest.get("scaler"):
        site.client.scaler.load_state_dict(rest["scaler"])
    site.run.samplers[site.name].gen.set_state(rest["sampler"])
    return done


def newest_state(site: Site, tag: str, before: int) -> dict | None:
    """The node's newest state file of this run series at or before round `before`."""
    for path in reversed(state_files(site, tag)):
        if file_round(path) <= before:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("format") != NODE_FORMAT or blob.get("settings") != site.key:
                raise ValueError(f"{path}: written with other settings; not resuming from it")
            return blob
    return None


def receive_shared(site: Site, record: ArrayRecord) -> None:
    """The server's shared weights into this site's client (only the shared keys may come)."""
    shared = from_record(record)
    if set(shared) != set(site.run.keys):
        raise ValueError(
            f"site {site.name}: the server sent {len(shared)} keys, not the "
            f"{len(site.run.keys)} shared ones"
        )
    store = next(iter(site.client.model_state.values())).device
    for k in site.run.keys:
        site.client.model_state[k] = shared[k].to(store)


def save_site_model(site: Site) -> str:
    """keep-heads-local: this site's binary model (shared representation + its own head)."""
    path = os.path.join(site.folder, f"{site.name}-model.pt")
    windows = site_windows(site.run.sites, binary(site.cfg))
    save_torch_atomic(
        {
            "format": "segviz-flower-site-model/1",
            "site": site.name,
            "mode": site.cfg.mode,
            "fedbn": site.cfg.fedbn,
            "unet": site.run.unet_cfg.to_dict(),
            "window": list(windows[site.name]),
            "shared_keys": list(site.run.keys),
            "state": dict(site.client.model_state),
        },
        path,
    )
    return path


app = ClientApp()


@app.query("node")
def node_kind(msg: Message, context: Context) -> Message:
    """How many SuperNodes Flower's simulation has, or 0 on a real SuperNode: the server sizes
    the run by it before asking any site to prepare."""
    info = {"supernodes": simulation_size(context.node_config)}
    return Message(RecordDict({"node": ConfigRecord(info)}), reply_to=msg)


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Which site this node is, how many training cases it has (for weighted averaging), and
    its settings' fingerprint; preparing the site here also fills the node's caches."""
    name, cfg, _, _ = node_settings(context)
    # e.g. a kidneys node while the run has nodes=2: it stays idle
    if name not in NODE_SITES[cfg.nodes]:
        info = {"site": name, "member": False}
        return Message(RecordDict({"site": ConfigRecord(info)}), reply_to=msg)
    site = open_site(context)
    info = {"site": site.name, "member": True, "cases": int(site.client.weight),
            "settings": site.key}
    return Message(RecordDict({"site": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """One round at this site: the server's shared weights in, local training, shared weights out.
    """
    cfg = msg.content["config"]
    round_, tag, counted = int(cfg["round"]), str(cfg["tag"]), int(cfg["counted"])
    site = open_site(context)
    restore_state(site, context, counted, tag)
    receive_shared(site, msg.content["shared"])
    loss = fl.local_train(
        site.run.model, site.run.optimizer, site.client, site.run.local_steps[site.name]
    )
    keep_state(site, context, round_, tag, counted)
    sent = {k: site.client.model_state[k] for k in site.run.keys}
    return Message(
        RecordDict({"shared": to_record(sent), "metrics": MetricRecord({"loss": loss})}),
        reply_to=msg,
    )


@app.query("finish")
def finish_site(msg: Message, context: Context) -> Message:
    """After the last round: take the final shared weights; send the task block once, or keep
    the whole binary model on this node (keep-heads-local)."""
    cfg = msg.content["config"]
    site = open_site(context)
    restore_state(site, context, int(cfg["counted"]), str(cfg["tag"]))
    receive_shared(site, msg.content["shared"])
    if cfg["keep-heads-local"]:
        path = save_site_model(site)
        print(f"site {site.name}: kept its model (shared representation + head) in {path}")
        return Message(
            RecordDict({"site": ConfigRecord({"site": site.name, "path": path})}), reply_to=msg
        )
    local = {
        k: site.client.model_state[k] for k in local_keys(site.client.model_state, site.run.keys)
    }
    return Message(RecordDict({"local": to_record(local)}), reply_to=msg)
