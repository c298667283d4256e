"""SegViz over Flower: the federation of `train.py`, with one SuperNode per site.

This file holds the Flower app (declared in pyproject.toml, [tool.flwr.app]):

- `app`, the ClientApp. Every SuperNode is one site: its node config names the site and where
  its data is (`--node-config "site='liver' data-root='...'"`; the phantom when there is no
  data-root). A round of local training is `fl.local_train` on the very client that
  `train.build_run` builds for the in-process loop: same sampler seed, same initial weights
  from the run's seed, same Adam, learning rate and loss. What never leaves the site
  (the task block, Adam's moments, the sampler's random state) stays in the node's
  Context.state between rounds, and in a file on the node for resuming.
- `server`, the ServerApp. It sends the shared weights (`segviz.shared_keys`: `rep.*` in
  segviz, every key in fedavg), combines what comes back with `robust.combine_updates` (mean,
  median or trimmed mean; the Guard's refusals; optional DP noise), counts a node that does not
  answer in time as absent, and after the last round collects each site's task block once to
  assemble the meta-model, which `train.finish` tests and saves (model.pt and metrics.json, as
  train.py writes them). With keep-heads-local the heads stay on their nodes and the server
  keeps the shared representation only.

Only this file needs Flower; train.py and the rest of the core never import it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import fl
import robust
import train
from common import save_torch_atomic, write_json_atomic
from data import NODE_SITES, Case, DataError
from datasets import Source, check_labelled, find_sources, load_source, real_federation, split_validation
from phantom import PhantomSpec, phantom_federation

State = fl.State
FEDERATED = ("segviz", "fedavg", "single")  # modes without pooled data (central/oracle pool every site's images)

# ---------------------------------------------------------------------------------------
# The run config: train.py's own flags, so both sides check and default them as train.py does
# ---------------------------------------------------------------------------------------

# keys of the run config that are the server's own; every other key is a train.py flag of the
# same name (`rounds` -> --rounds), so a flag added to train.py needs one line in pyproject.toml
SERVER_KEYS = {"out", "cache", "device", "test-data", "keep-heads-local", "resume", "timeout", "wait-for-nodes"}
# TOML has no null: 0 (and "" for channels) stands for "not given", so train.py's default
# applies (the preset's learning rate and widths, every case, no limit)
ZERO_IS_UNSET = {"lr", "max-cases", "max-update-norm", "norm-factor", "dp-clip", "channels"}
NEGATABLE = {"largest"}  # on by default in train.py: false must be said (--no-largest)
# settings that may differ between the machines of one run (paths) or grow on resume
MACHINE_SETTINGS = {"cache", "data_root", "data", "rounds"}


def train_argv(run_config: Mapping) -> list[str]:
    """The train.py command line that the run config stands for."""
    argv: list[str] = []
    for key, value in run_config.items():
        if key in SERVER_KEYS or (key in ZERO_IS_UNSET and not value):
            continue
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else [f"--no-{key}"] if key in NEGATABLE else []
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_train_args(argv: list[str]) -> argparse.Namespace:
    """train.py's parsing, defaults and checks; a refused setting raises instead of exiting."""
    try:
        args = train.parse_args(argv)
    except SystemExit as e:  # argparse has printed why on stderr
        raise ValueError(f"train.py refuses these settings: {' '.join(argv)}") from e
    if args.mode not in FEDERATED:
        raise ValueError(f"mode {args.mode!r} pools every site's data and cannot run over Flower; "
                         f"use one of {', '.join(FEDERATED)}")
    return args


def later_defaults(args: argparse.Namespace) -> dict:
    return {"channels": list(train.PRESETS[args.preset].channels)}


def settings_key(args: argparse.Namespace) -> str:
    """A fingerprint of what defines the training (not paths or devices): the server and every
    node must agree on it, and a resumed run must match the state it resumes."""
    settings = {k: v for k, v in train.settings_of(args).items() if k not in MACHINE_SETTINGS}
    settings["real"] = args.real
    # settings added after a state file was written are left out while at their default, so
    # that a run started before they existed still resumes
    for key, default in later_defaults(args).items():
        if settings.get(key) == default:
            del settings[key]
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


def to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes):
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def local_keys(state: Mapping[str, torch.Tensor], shared: list[str]) -> list[str]:
    """The keys a site keeps during the rounds and sends once at the end (its task block; with
    FedBN also its normalisation layers; nothing in fedavg)."""
    return [k for k in state if k not in set(shared)]


# ---------------------------------------------------------------------------------------
# The ClientApp: one site per SuperNode
# ---------------------------------------------------------------------------------------


@dataclass
class Site:
    """A SuperNode's site as train.py builds it: its client, live model and sampler."""

    name: str
    args: argparse.Namespace
    run: train.Run
    folder: str  # on this node: state files for resuming, and a kept head

    @property
    def client(self) -> fl.Client:
        return self.run.clients[0]


def site_settings(context: Context) -> tuple[str, argparse.Namespace, str]:
    """This node's site, the run's settings as train.py parses them (with this node's paths and
    device), and the node's folder for this run."""
    node, cfg = context.node_config, context.run_config
    site = str(node.get("site", ""))
    if threads := int(node.get("threads", 0)):
        torch.set_num_threads(threads)
    data_root = str(node.get("data-root", ""))
    if bool(data_root) != bool(cfg.get("test-data", "")):
        raise ValueError(f"site {site}: data-root {data_root!r} on this node but test-data "
                         f"{cfg.get('test-data', '')!r} in the run: real data everywhere or the phantom everywhere")
    folder = os.path.join(os.path.abspath(str(node.get("out", "runs/flower-node"))), run_label(cfg))
    cache = str(node.get("cache", "")) or os.environ.get("SEGVIZ_CACHE", os.path.expanduser("~/.cache/segviz"))
    argv = [*train_argv(cfg), "--out", folder, "--cache", cache, "--device", str(node.get("device", "auto"))]
    return site, parse_train_args(argv + (["--data-root", data_root] if data_root else [])), folder


def open_site(context: Context) -> Site:
    """Build this node's site from its node config and the run config.

    Every message starts a fresh ClientApp process, so this runs each time; the data comes
    from the cache after the first time."""
    site, args, folder = site_settings(context)
    if site not in NODE_SITES[args.nodes]:
        raise ValueError(f"node config site={site!r}: not one of {NODE_SITES[args.nodes]} (nodes={args.nodes})")
    spacing, spec = train.data_spec(args)
    cases = site_cases(args, site, spacing, spec)
    torch.manual_seed(args.seed)  # the initial weights train.py draws after seeding with the run's seed
    return Site(site, args, train.build_run(args, {site: cases}, only=(site,)), folder)


def site_cases(args: argparse.Namespace, site: str, spacing, spec: PhantomSpec) -> list[Case]:
    """This site's training cases: the phantom's, or its own dataset under data-root."""
    try:
        if not args.real:
            return phantom_federation((site,), seed=args.seed, spec=spec, cache_dir=args.cache)[0][site]
        source = find_sources((site,), args.data_root, args.overrides)[site]
        keep, _, _ = split_validation(source.pairs, site, args.val_split, args.seed)
        source = Source(source.role, source.layout, source.root, keep, source.declared, source.problems)
        cases = load_source(source, spacing, args.cache, args.workers, args.max_cases)
        check_labelled(cases, source)
        return cases
    except DataError as e:
        raise ValueError(f"site {site}: {e}") from None


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
    local = {k: site.client.model_state[k] for k in local_keys(site.client.model_state, site.run.keys)}
    # Adam's state is nested (per-parameter moments and step counts, param groups with tuples),
    # so it travels as torch.save bytes, read back with weights_only=True
    rest = {"optim": site.client.optim_state, "sampler": site.run.samplers[site.name].gen.get_state()}
    context.state["local"] = to_record(local)
    context.state["node"] = ConfigRecord({"round": round_, "tag": tag, "rest": to_bytes(rest)})
    os.makedirs(site.folder, exist_ok=True)
    blob = {"format": "segviz-flower-node/1", "site": site.name, "tag": tag, "round": round_,
            "settings": settings_key(site.args), "local": local, "rest": rest}
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
    that never reached the server is undone, as an absent client does not train in train.py.
    Returns that round; 0 when the site starts from the seed's weights."""
    node = context.state.config_records.get("node")
    if node is not None and node["tag"] == tag and int(node["round"]) <= counted:
        local, rest, done = from_record(context.state["local"]), from_bytes(node["rest"]), int(node["round"])
    else:
        blob = newest_state(site, tag, counted)
        if blob is None:
            return 0
        local, rest, done = blob["local"], blob["rest"], int(blob["round"])
    store = next(iter(site.client.model_state.values())).device
    site.client.model_state.update({k: v.to(store) for k, v in local.items()})
    site.client.optim_state = fl.stored(rest["optim"], store)
    site.run.samplers[site.name].gen.set_state(rest["sampler"])
    return done


def newest_state(site: Site, tag: str, before: int) -> dict | None:
    """The node's newest state file of this run series at or before round `before`."""
    for path in reversed(state_files(site, tag)):
        if file_round(path) <= before:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("settings") != settings_key(site.args):
                raise ValueError(f"{path}: written with other settings; not resuming from it")
            return blob
    return None


def receive_shared(site: Site, record: ArrayRecord) -> None:
    """The server's shared weights into this site's client (only the shared keys may come)."""
    shared = from_record(record)
    if set(shared) != set(site.run.keys):
        raise ValueError(f"site {site.name}: the server sent {len(shared)} keys, not the {len(site.run.keys)} "
                         "shared ones")
    store = next(iter(site.client.model_state.values())).device
    for k in site.run.keys:
        site.client.model_state[k] = shared[k].to(store)


def save_site_model(site: Site) -> str:
    """keep-heads-local: this site's binary model (shared representation + its own head)."""
    path = os.path.join(site.folder, f"{site.name}-model.pt")
    windows = train.site_windows(site.run.sites, site.args.mode)
    save_torch_atomic({"format": "segviz-flower-site-model/1", "site": site.name, "mode": site.args.mode,
                 "fedbn": site.args.fedbn, "unet": site.run.unet_cfg.to_dict(), "window": list(windows[site.name]),
                 "shared_keys": list(site.run.keys), "state": dict(site.client.model_state)}, path)
    return path


app = ClientApp()


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Which site this node is, how many training cases it has (for --weighted), and its
    settings' fingerprint; loading the data here also fills the node's cache once."""
    name, args, _ = site_settings(context)
    if name not in NODE_SITES[args.nodes]:  # e.g. a kidneys node while the run has nodes=2: it stays idle
        return Message(RecordDict({"site": ConfigRecord({"site": name, "member": False})}), reply_to=msg)
    site = open_site(context)
    info = {"site": site.name, "member": True, "cases": int(site.client.weight),
            "batch": int(site.run.samplers[site.name].cfg.batch), "settings": settings_key(site.args)}
    return Message(RecordDict({"site": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """One round at this site: the server's shared weights in, local training, shared weights out."""
    cfg = msg.content["config"]
    round_, tag, counted = int(cfg["round"]), str(cfg["tag"]), int(cfg["counted"])
    site = open_site(context)
    restore_state(site, context, counted, tag)
    receive_shared(site, msg.content["shared"])
    loss = fl.local_train(site.run.model, site.run.optimizer, site.client, site.run.local_steps[site.name])
    keep_state(site, context, round_, tag, counted)
    sent = {k: site.client.model_state[k] for k in site.run.keys}
    return Message(RecordDict({"shared": to_record(sent), "metrics": MetricRecord({"loss": loss})}), reply_to=msg)


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
        return Message(RecordDict({"site": ConfigRecord({"site": site.name, "path": path})}), reply_to=msg)
    local = {k: site.client.model_state[k] for k in local_keys(site.client.model_state, site.run.keys)}
    return Message(RecordDict({"local": to_record(local)}), reply_to=msg)


# ---------------------------------------------------------------------------------------
# The ServerApp: rounds, aggregation, the meta-model
# ---------------------------------------------------------------------------------------

SERVER_STATE = "flower_state.pt"
SERVER_FORMAT = "segviz-flower-server/1"
EXCHANGE_LOG = "flower.json"


@dataclass(frozen=True)
class Options:
    """Run-config settings of the server that train.py does not have."""

    out: str
    keep_heads_local: bool
    resume: bool
    timeout: float  # seconds to wait for the replies of one exchange
    wait_for_nodes: float  # seconds to wait at the start for a node of every site


def options(run_config: Mapping) -> Options:
    return Options(out=str(run_config.get("out") or "runs/flower"),
                   keep_heads_local=bool(run_config.get("keep-heads-local", False)),
                   resume=bool(run_config.get("resume", False)), timeout=float(run_config.get("timeout", 600)),
                   wait_for_nodes=float(run_config.get("wait-for-nodes", 300)))


def server_args(run_config: Mapping, opts: Options) -> argparse.Namespace:
    argv = [*train_argv(run_config), "--out", opts.out, "--device", str(run_config.get("device", "auto"))]
    if cache := str(run_config.get("cache", "")):
        argv += ["--cache", cache]
    if test := str(run_config.get("test-data", "")):
        argv += ["--data-root", test]  # only the test set is searched for on the server
    return parse_train_args(argv)


@dataclass
class Coordinator:
    """The server's side of a run: train.py's Run with one stand-in client per site. A stand-in
    holds the shared weights (as every in-process client does after a round), the site's loss
    history and weight; its task block arrives once, at the end."""

    args: argparse.Namespace
    opts: Options
    run: train.Run
    tag: str  # names this run series on the nodes' disks; kept when resuming
    nodes: dict[str, int] = field(default_factory=dict)  # site -> Flower node id
    counted: dict[str, int] = field(default_factory=dict)  # site -> last round whose reply arrived
    idle: set[int] = field(default_factory=set)  # connected nodes of sites this run does not include
    journal: dict = field(default_factory=dict)  # what the server sent and received (flower.json)

    @property
    def shared(self) -> State:
        return {k: self.run.clients[0].model_state[k] for k in self.run.keys}


def exchange(grid: Grid, messages: list[Message], timeout: float, enough=None) -> dict[int, Message]:
    """Send and wait for the replies, as grid.send_and_receive does, but polling every 0.5 s
    (its 3 s are most of a short round's wait) and stopping early once `enough(replies)`.
    Returns message index -> reply (an error reply about a lost upload names no sender, so
    replies are matched to what was sent, not to who sent it)."""
    ids = list(grid.push_messages(messages))
    waiting = {i for i in ids if i}
    replies: dict[int, Message] = {}
    deadline = time.time() + timeout
    while waiting and time.time() < deadline:
        for m in grid.pull_messages(waiting):
            replies[ids.index(m.metadata.reply_to_message_id)] = m
            waiting.discard(m.metadata.reply_to_message_id)
        if enough is not None and enough(list(replies.values())):
            break
        if waiting:
            time.sleep(0.5)
    return replies


def remote(*_):
    raise RuntimeError("this client trains on its own SuperNode")


def coordinator(args: argparse.Namespace, opts: Options) -> Coordinator:
    """The server's federation at round 0: the same model, initial weights and shared keys as
    train.py's (built by train.build_run without any site's data)."""
    torch.manual_seed(args.seed)
    run = train.build_run(args, {}, only=())
    start = fl.snapshot(run.model, "cpu")
    run.clients = [fl.Client(s, dict(start), {}, remote, remote) for s in run.sites]
    journal = {"mode": args.mode, "fedbn": args.fedbn, "shared_keys": list(run.keys), "rounds": [], "final": {}}
    return Coordinator(args, opts, run, secrets.token_hex(4), counted=dict.fromkeys(run.sites, 0), journal=journal)


def discover(grid: Grid, co: Coordinator) -> None:
    """Ask each connected node which site it is until every site of the federation answered."""
    sites = NODE_SITES[co.args.nodes]
    deadline = time.time() + co.opts.wait_for_nodes
    asked: set[int] = set()
    while any(s not in co.nodes for s in sites):
        new = [n for n in grid.get_node_ids() if n not in asked and n not in co.idle]
        asked.update(new)
        if new:
            messages = [Message(RecordDict(), dst_node_id=n, message_type="query", ttl=co.opts.timeout) for n in new]
            # a node that left without saying so may still be listed: stop once every site answered
            replies = exchange(grid, messages, co.opts.timeout, lambda rs: named(rs) | set(co.nodes) >= set(sites))
            for reply in replies.values():
                adopt_node(co, reply)
        missing = [s for s in sites if s not in co.nodes]
        if missing and time.time() > deadline:
            raise RuntimeError(f"no SuperNode for site(s) {', '.join(missing)} after {co.opts.wait_for_nodes:g} s "
                               "(start one per site: flower-supernode --node-config \"site='...'\")")
        if missing:
            time.sleep(1)
    co.journal["nodes"] = dict(co.nodes)
    print(f"sites: {', '.join(f'{s} (node {n})' for s, n in co.nodes.items())}")


def named(replies: list[Message]) -> set[str]:
    """The sites that answered a discovery query."""
    return {str(r.content["site"]["site"]) for r in replies if r.has_content() and "site" in r.content}


def adopt_node(co: Coordinator, reply: Message, live: set[int] | None = None) -> None:
    """Record which site a node answered it is, refusing nodes that do not fit the run. A site
    may move to a new node only when its old node is no longer connected (`live`)."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise RuntimeError(f"node {node} could not open its site: {reply.error.reason}")
    info = reply.content["site"]
    site = str(info["site"])
    if not info["member"]:
        co.idle.add(node)
        print(f"node {node} (site={site!r}) is not one of this run's sites {NODE_SITES[co.args.nodes]}; left idle")
        return
    if site in co.nodes and co.nodes[site] != node and (live is None or co.nodes[site] in live):
        raise RuntimeError(f"two SuperNodes say they are site {site} (nodes {co.nodes[site]} and {node})")
    if info["settings"] != settings_key(co.args):
        raise RuntimeError(f"node {node} ({site}) runs other settings than the server (another code version?)")
    co.nodes[site] = node
    client = next(c for c in co.run.clients if c.name == site)
    client.weight = float(info["cases"])
    # train.finish records the batch size from the first site's sampler; the server has none,
    # so it keeps what the nodes report
    co.run.samplers[site] = SimpleNamespace(cfg=SimpleNamespace(batch=int(info["batch"])))


def refresh_nodes(grid: Grid, co: Coordinator) -> list[str]:
    """A restarted SuperNode comes back under a new node id: when a site's node is no longer
    connected, ask the nodes not seen yet which site they are (its state file on the node
    carries its task block and Adam's state over the restart)."""
    live = set(grid.get_node_ids())
    gone = {s for s, n in co.nodes.items() if n not in live}
    new = [n for n in live if n not in co.nodes.values() and n not in co.idle]
    if not gone or not new:
        return []
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query", ttl=co.opts.timeout) for n in new]
    events = []
    for reply in exchange(grid, messages, co.opts.timeout, lambda rs: named(rs) >= gone).values():
        if reply.has_content() and reply.content["site"]["member"] and str(reply.content["site"]["site"]) in gone:
            adopt_node(co, reply, live)
            events.append(f"{reply.content['site']['site']} is back as node {reply.metadata.src_node_id}")
    co.journal["nodes"] = dict(co.nodes)
    return events


def one_round(grid: Grid, co: Coordinator, r: int) -> str:
    """Round r (0-based) as fl.federated_round does it in-process, with the training on the
    nodes; returns the round's line."""
    args, run = co.args, co.run
    rejoined = refresh_nodes(grid, co)
    present = robust.present(run.clients, args.dropout, run.dropout_rng) if args.dropout else list(run.clients)
    reference = {k: v.clone() for k, v in co.shared.items()}
    shared = to_record(reference)
    messages = [Message(RecordDict({"shared": shared, "config": ConfigRecord(
        {"round": r + 1, "tag": co.tag, "counted": co.counted[c.name]})}), dst_node_id=co.nodes[c.name],
        message_type="train", group_id=str(r + 1), ttl=co.opts.timeout) for c in present]
    replies = exchange(grid, messages, co.opts.timeout)
    record = {"round": r + 1, "sent_to": [c.name for c in present], "received": {}}
    answered, sent, losses, refused, silent = [], [], {}, {}, []
    for i, c in enumerate(present):
        reply = replies.get(i)
        if reply is None or reply.has_error():
            why = "no reply" if reply is None else f"error: {(reply.error.reason or '?').splitlines()[0][:100]}"
            silent.append(f"{c.name} did not take part ({why})")
            continue
        record["received"][c.name] = array_keys(reply.content)
        co.counted[c.name] = r + 1  # the site trained this round and the server has its update
        losses[c.name] = float(reply.content["metrics"]["loss"])
        if record["received"][c.name] != sorted(run.keys) or "shared" not in reply.content.array_records:
            refused[c.name] = "sent other keys than the shared ones"
            continue
        answered.append(c)
        sent.append(from_record(reply.content["shared"]))
    absent = [c.name for c in run.clients if c.name not in record["received"]]
    norms = {}
    if run.keys and answered:
        weights = [c.weight for c in answered] if args.weighted else None
        merged, norm_list, refused_at = robust.combine_updates(
            sent, reference, robust.AGGREGATORS[args.aggregate], weights,
            robust.Guard(args.max_update_norm, args.norm_factor or None), run.privacy)
        norms = {c.name: n for c, n in zip(answered, norm_list)}
        refused |= {answered[i].name: why for i, why in refused_at.items()}
        for c in run.clients:
            for k in run.keys:
                c.model_state[k] = merged[k].clone()
    for c in run.clients:  # as in train.py: every site that trained this round, refused or not
        if c.name in losses:
            c.history.append(losses[c.name])
    events = ([f"absent: {', '.join(absent)}"] if absent else []) + [f"refused {n}: {why}" for n, why in
                                                                     refused.items()] + silent + rejoined
    run.log += [f"round {r + 1}: {e}" for e in events]
    run.norms.append({k: round(v, 6) for k, v in norms.items()})
    co.journal["rounds"].append({**record, "absent": absent, "refused": refused})
    line = f"round {r + 1:>3}/{args.rounds}  loss " + "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
    return line + ("  | " + "; ".join(events) if events else "")


def collect(grid: Grid, co: Coordinator) -> None:
    """After the last round: every site gets the final shared weights and sends its task block
    once (or, with keep-heads-local, keeps its model and says where)."""
    for event in refresh_nodes(grid, co):
        print(event)
    shared = to_record(co.shared)
    messages = [Message(RecordDict({"shared": shared, "config": ConfigRecord(
        {"tag": co.tag, "counted": co.counted[c.name], "keep-heads-local": co.opts.keep_heads_local})}),
        dst_node_id=co.nodes[c.name], message_type="query.finish", ttl=co.opts.timeout) for c in co.run.clients]
    replies = exchange(grid, messages, co.opts.timeout)
    final = co.journal["final"] = {"keep_heads_local": co.opts.keep_heads_local, "received": {}, "heads": {}}
    for i, c in enumerate(co.run.clients):
        reply = replies.get(i)
        if reply is None or reply.has_error():
            why = "no reply" if reply is None else reply.error.reason
            raise RuntimeError(f"site {c.name} did not finish ({why}); its head is still on its node: run again "
                               "with resume=true to collect it")
        final["received"][c.name] = array_keys(reply.content)
        if co.opts.keep_heads_local:
            final["heads"][c.name] = str(reply.content["site"]["path"])
            continue
        local = from_record(reply.content["local"])
        expected = local_keys(c.model_state, co.run.keys)
        if sorted(local) != sorted(expected):
            raise RuntimeError(f"site {c.name} sent {sorted(local)[:3]}..., not its {len(expected)} local keys")
        c.model_state = {k: c.model_state[k] if k in co.run.keys else local[k] for k in c.model_state}


def save_server(co: Coordinator, rounds_done: int) -> None:
    """The server's state after a round (what a resumed run needs from the server; each node
    keeps its own) and the journal of what it received (flower.json)."""
    run = co.run
    os.makedirs(co.opts.out, exist_ok=True)
    save_torch_atomic({"format": SERVER_FORMAT, "round": rounds_done, "tag": co.tag, "settings": settings_key(co.args),
                 "shared": co.shared, "weights": {c.name: c.weight for c in run.clients},
                 "history": {c.name: list(c.history) for c in run.clients}, "counted": dict(co.counted),
                 "log": list(run.log), "norms": list(run.norms), "journal": co.journal,
                 "dropout_rng": run.dropout_rng.get_state(),
                 "dp_rng": run.privacy.generator.get_state() if run.privacy else None},
                os.path.join(co.opts.out, SERVER_STATE))
    write_json_atomic(os.path.join(co.opts.out, EXCHANGE_LOG), co.journal)


def resume_server(co: Coordinator) -> int:
    """Load the server's state (resume=true); returns the rounds already done (0: fresh start)."""
    path = os.path.join(co.opts.out, SERVER_STATE)
    if not os.path.exists(path):
        print(f"resume: no {path}, starting afresh")
        return 0
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != SERVER_FORMAT or blob["settings"] != settings_key(co.args):
        raise RuntimeError(f"{path}: not a state of this run's settings; not resuming from it")
    if blob["round"] > co.args.rounds:
        raise RuntimeError(f"{path}: {blob['round']} rounds done, more than rounds={co.args.rounds}")
    co.tag, co.journal, co.counted = blob["tag"], blob["journal"], dict(blob["counted"])
    for c in co.run.clients:
        c.model_state.update(blob["shared"])
        c.history, c.weight = list(blob["history"][c.name]), blob["weights"][c.name]
    co.run.log[:], co.run.norms[:] = blob["log"], blob["norms"]
    co.run.dropout_rng.set_state(blob["dropout_rng"])
    if co.run.privacy is not None:
        co.run.privacy.generator.set_state(blob["dp_rng"])
    print(f"resuming {path} after round {blob['round']}/{co.args.rounds}")
    return int(blob["round"])


def server_test_set(args: argparse.Namespace, spacing, spec: PhantomSpec) -> tuple[list[Case], dict]:
    """The fully labelled test set, on the server's machine: the phantom's, or test-data's."""
    if not args.real:
        return phantom_federation((), seed=args.seed, spec=spec, cache_dir=args.cache)[1], {"source": "phantom"}
    try:
        _, test, info = real_federation((), args.data_root, args.overrides, spacing, args.cache, args.workers,
                                        args.val_split, args.seed, args.max_cases)
    except DataError as e:
        raise RuntimeError(str(e)) from None
    return test, {"source": "real", **info, "val_split": args.val_split}


def keep_representation(co: Coordinator) -> None:
    """keep-heads-local: the server's result is the shared representation alone."""
    path = os.path.join(co.opts.out, "representation.pt")
    save_torch_atomic({"format": "segviz-flower-representation/1", "mode": co.args.mode, "fedbn": co.args.fedbn,
                 "unet": co.run.unet_cfg.to_dict(), "shared_keys": list(co.run.keys), "state": co.shared}, path)
    heads = co.journal["final"]["heads"]
    print(f"shared representation: {path}; each site kept its head on its node: "
          + "; ".join(f"{s}: {p}" for s, p in heads.items()))


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """The whole run: discover the sites, train the rounds, assemble, test and save."""
    t_start = time.time()
    opts = options(context.run_config)
    args = server_args(context.run_config, opts)
    spacing, spec = train.data_spec(args)
    test_cases, data_info = ([], {}) if opts.keep_heads_local else server_test_set(args, spacing, spec)
    t_data = time.time()
    co = coordinator(args, opts)
    start = resume_server(co) if opts.resume else 0
    discover(grid, co)
    print(f"{args.name} over Flower: {args.rounds} rounds x {args.local_steps} local steps | "
          f"{len(co.run.keys)}/{len(co.run.clients[0].model_state)} keys shared | out {os.path.abspath(opts.out)}")
    for r in range(start, args.rounds):
        print(one_round(grid, co, r), flush=True)
        save_server(co, r + 1)
    collect(grid, co)
    save_server(co, args.rounds)
    if opts.keep_heads_local:
        keep_representation(co)
        return
    train.finish(args, co.run, test_cases, spec, spacing, data_info, (t_start, t_data, time.time()))
