"""The ServerApp: size the federation, discover the sites, run the rounds, assemble, test and save.

It sends the shared weights (`segviz.shared_keys`: `rep.*` in segviz, every key in fedavg),
combines what comes back with the in-process loop's combining function (`experiments.variants`:
the mean, or robust.py's median or trimmed mean, the Guard's refusals and optional DP noise),
counts a node that does not answer in time as absent,
and after the last round collects each site's task block once to assemble the meta-model,
which `train.finish` tests and saves (model.pt and metrics.json, as train.py writes them).
With keep-heads-local the heads stay on their nodes and the server keeps the representation.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

import fl
import train
from cases import load_federation
from common import save_torch_atomic, write_json_atomic
from data import NODE_SITES, Case, DataError
from experiments.variants import extensions
from settings import Config

from .task import (
    VARIANTS,
    State,
    array_keys,
    config_from,
    from_record,
    local_keys,
    settings_key,
    simulation_sites,
    to_record,
    variant_of,
)

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
    return Options(
        out=str(run_config.get("out") or "runs/flower"),
        keep_heads_local=bool(run_config.get("keep-heads-local", False)),
        resume=bool(run_config.get("resume", False)),
        timeout=float(run_config.get("timeout", 600)),
        wait_for_nodes=float(run_config.get("wait-for-nodes", 300)),
    )


def server_config(run_config: Mapping, opts: Options) -> Config:
    """The run's Config on the server: only the test set is searched for under data-root (or data).
    """
    return config_from(
        run_config,
        out=opts.out,
        cache=str(run_config.get("cache", "")),
        device=str(run_config.get("device", "auto")) or "auto",
        data_root=str(run_config.get("data-root", "")),
        data=str(run_config.get("data", "")),
    )


@dataclass
class Coordinator:
    """The server's side of a run: train.Run with one stand-in client per site. A stand-in
    holds the shared weights (as every in-process client does after a round), the site's loss
    history and weight; its task block arrives once, at the end."""

    cfg: Config
    opts: Options
    key: str  # settings_key
    run: train.Run
    tag: str  # names this run series on the nodes' disks; kept when resuming
    nodes: dict[str, int] = field(default_factory=dict)  # site -> Flower node id
    counted: dict[str, int] = field(default_factory=dict)  # site -> last round whose reply arrived
    # connected nodes of sites this run does not include
    idle: set[int] = field(default_factory=set)
    journal: dict = field(default_factory=dict)  # what the server sent and received (flower.json)

    @property
    def shared(self) -> State:
        return {k: self.run.clients[0].model_state[k] for k in self.run.keys}


def exchange(grid: Grid, messages: list[Message], timeout: float,
             enough: Callable[[list[Message]], bool] | None = None) -> dict[int, Message]:
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


def simulation_size(grid: Grid, opts: Options) -> int:
    """How many SuperNodes Flower's simulation has, asked of the first nodes to connect (before
    any site prepares); 0 when they are real SuperNodes."""
    deadline = time.time() + opts.wait_for_nodes
    while not (nodes := list(grid.get_node_ids())):
        if time.time() > deadline:
            raise RuntimeError(
                f"no SuperNode connected after {opts.wait_for_nodes:g} s (start one per site: "
                "flower-supernode --node-config \"site='...'\")"
            )
        time.sleep(0.5)
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type="query.node", ttl=opts.timeout)
        for n in nodes
    ]
    replies = exchange(grid, messages, opts.timeout, lambda rs: any(r.has_content() for r in rs))
    answers = [r for r in replies.values() if r.has_content()]
    # no answer: discovery reports what each node says
    return int(answers[0].content["node"]["supernodes"]) if answers else 0


def sized(run_config: Mapping, supernodes: int) -> Mapping:
    """The run config with as many sites as a simulation of `supernodes` SuperNodes can train
    (one per SuperNode, up to `nodes`); unchanged for real SuperNodes."""
    if not supernodes:
        return run_config
    wanted, nodes = int(run_config.get("nodes", 4)), simulation_sites(run_config, supernodes)
    hint = f'--federation-config "num-supernodes={wanted}"'
    more = f"; for all {wanted}: {hint}" if nodes < wanted else ""
    print(
        f"Flower's simulation has {supernodes} SuperNode(s): {nodes} site(s) of the run's "
        f"{wanted} take part ({', '.join(NODE_SITES[nodes])}){more}",
        flush=True,
    )
    return {**run_config, "nodes": nodes}


def remote(*_) -> NoReturn:
    raise RuntimeError("this client trains on its own SuperNode")


def coordinator(cfg: Config, opts: Options, v: dict) -> Coordinator:
    """The server's federation at round 0: the same model, initial weights and shared keys as
    train.py's (built by train.build_run without any site's data)."""
    torch.manual_seed(cfg.seed)
    changed = {k.replace("-", "_"): val for k, val in v.items() if val != VARIANTS[k]}
    run = train.build_run(cfg, {}, extensions(cfg, changed), only=())  # seeded as experiments train
    start = fl.snapshot(run.model, "cpu")
    run.clients = [fl.Client(s, dict(start), {}, remote, remote) for s in run.sites]
    journal = {
        "mode": cfg.mode,
        "fedbn": cfg.fedbn,
        "shared_keys": list(run.keys),
        "rounds": [],
        "final": {},
    }
    return Coordinator(cfg, opts, settings_key(cfg, v), run, secrets.token_hex(4),
                       counted=dict.fromkeys(run.sites, 0), journal=journal)


def discover(grid: Grid, co: Coordinator) -> None:
    """Ask each connected node which site it is until every site of the federation answered."""
    sites = NODE_SITES[co.cfg.nodes]
    deadline = time.time() + co.opts.wait_for_nodes
    asked: set[int] = set()
    while any(s not in co.nodes for s in sites):
        new = [n for n in grid.get_node_ids() if n not in asked and n not in co.idle]
        asked.update(new)
        if new:
            messages = [
                Message(RecordDict(), dst_node_id=n, message_type="query", ttl=co.opts.timeout)
                for n in new
            ]
            # a node that left without saying so may still be listed: stop once every site answered
            replies = exchange(
                grid, messages, co.opts.timeout, lambda rs: named(rs) | set(co.nodes) >= set(sites)
            )
            for reply in replies.values():
                adopt_node(co, reply)
        missing = [s for s in sites if s not in co.nodes]
        if missing and time.time() > deadline:
            raise RuntimeError(
                f"no SuperNode for site(s) {', '.join(missing)} after {co.opts.wait_for_nodes:g} s "
                "(start one per site: flower-supernode --node-config \"site='...'\")"
            )
        if missing:
            time.sleep(1)
    co.journal["nodes"] = dict(co.nodes)
    print(f"sites: {', '.join(f'{s} (node {n})' for s, n in co.nodes.items())}")


def named(replies: list[Message]) -> set[str]:
    """The sites that answered a discovery query."""
    return {
        str(r.content["site"]["site"]) for r in replies if r.has_content() and "site" in r.content
    }


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
        print(
            f"node {node} (site={site!r}) is not one of this run's sites "
            f"{NODE_SITES[co.cfg.nodes]}; left idle"
        )
        return
    if site in co.nodes and co.nodes[site] != node and (live is None or co.nodes[site] in live):
        raise RuntimeError(
            f"two SuperNodes say they are site {site} (nodes {co.nodes[site]} and {node})"
        )
    if info["settings"] != co.key:
        raise RuntimeError(
            f"node {node} ({site}) runs other settings than the server (another code version?)"
        )
    co.nodes[site] = node
    client = next(c for c in co.run.clients if c.name == site)
    client.weight = float(info["cases"])


def refresh_nodes(grid: Grid, co: Coordinator) -> list[str]:
    """A restarted SuperNode comes back under a new node id: when a site's node is no longer
    connected, ask the nodes not seen yet which site they are (its state file on the node
    carries its task block and Adam's state over the restart)."""
    live = set(grid.get_node_ids())
    gone = {s for s, n in co.nodes.items() if n not in live}
    new = [n for n in live if n not in co.nodes.values() and n not in co.idle]
    if not gone or not new:
        return []
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type="query", ttl=co.opts.timeout) for n in new
    ]
    events = []
    for reply in exchange(grid, messages, co.opts.timeout, lambda rs: named(rs) >= gone).values():
        if (
            reply.has_content()
            and reply.content["site"]["member"]
            and str(reply.content["site"]["site"]) in gone
        ):
            adopt_node(co, reply, live)
            events.append(
                f"{reply.content['site']['site']} is back as node {reply.metadata.src_node_id}"
            )
    co.journal["nodes"] = dict(co.nodes)
    return events


def one_round(grid: Grid, co: Coordinator, r: int) -> str:
    """Round r (0-based) as fl.federated_round does it in-process, with the training on the
    nodes; returns the round's line."""
    cfg, run = co.cfg, co.run
    rejoined = refresh_nodes(grid, co)
    present = run.ext.present(run.clients) if run.ext.present else list(run.clients)
    reference = {k: v.clone() for k, v in co.shared.items()}
    shared = to_record(reference)
    messages = [
        Message(
            RecordDict(
                {
                    "shared": shared,
                    "config": ConfigRecord(
                        {"round": r + 1, "tag": co.tag, "counted": co.counted[c.name]}
                    ),
                }
            ),
            dst_node_id=co.nodes[c.name],
            message_type="train",
            group_id=str(r + 1),
            ttl=co.opts.timeout,
        )
        for c in present
    ]
    replies = exchange(grid, messages, co.opts.timeout)
    record = {"round": r + 1, "sent_to": [c.name for c in present], "received": {}}
    answered, sent, losses, refused, silent = [], [], {}, {}, []
    for i, c in enumerate(present):
        reply = replies.get(i)
        if reply is None or reply.has_error():
            why = (
                "no reply"
                if reply is None
                else f"error: {(reply.error.reason or '?').splitlines()[0][:100]}"
            )
            silent.append(f"{c.name} did not take part ({why})")
            continue
        record["received"][c.name] = array_keys(reply.content)
        co.counted[c.name] = r + 1  # the site trained this round and the server has its update
        losses[c.name] = float(reply.content["metrics"]["loss"])
        if (
            record["received"][c.name] != sorted(run.keys)
            or "shared" not in reply.content.array_records
        ):
            refused[c.name] = "sent other keys than the shared ones"
            continue
        answered.append(c)
        sent.append(from_record(reply.content["shared"]))
    absent = [c.name for c in run.clients if c.name not in record["received"]]
    norms = {}
    if run.keys and answered:
        # the same combining function as the in-process loop (fl.mean, or robust.combiner's)
        merged, notes = run.ext.combine(
            sent, reference, [c.weight for c in answered] if run.ext.weighted else None
        )
        norms = {c.name: n for c, n in zip(answered, notes.get("norms", []))}
        refused |= {answered[i].name: why for i, why in notes.get("refused", {}).items()}
        for c in run.clients:
            for k in run.keys:
                c.model_state[k] = merged[k].clone()
    for c in run.clients:  # as in train.py: every site that trained this round, refused or not
        if c.name in losses:
            c.history.append(losses[c.name])
    events = (
        ([f"absent: {', '.join(absent)}"] if absent else [])
        + [f"refused {n}: {why}" for n, why in refused.items()]
        + silent
        + rejoined
    )
    run.log += [f"round {r + 1}: {e}" for e in events]
    run.norms.append({k: round(v, 6) for k, v in norms.items()})
    co.journal["rounds"].append({**record, "absent": absent, "refused": refused})
    line = f"round {r + 1:>3}/{cfg.rounds}  loss " + "  ".join(
        f"{k} {v:.3f}" for k, v in losses.items()
    )
    return line + ("  | " + "; ".join(events) if events else "")


def collect(grid: Grid, co: Coordinator) -> None:
    """After the last round: every site gets the final shared weights and sends its task block
    once (or, with keep-heads-local, keeps its model and says where)."""
    for event in refresh_nodes(grid, co):
        print(event)
    shared = to_record(co.shared)
    messages = [
        Message(
            RecordDict(
                {
                    "shared": shared,
                    "config": ConfigRecord(
                        {
                            "tag": co.tag,
                            "counted": co.counted[c.name],
                            "keep-heads-local": co.opts.keep_heads_local,
                        }
                    ),
                }
            ),
            dst_node_id=co.nodes[c.name],
            message_type="query.finish",
            ttl=co.opts.timeout,
        )
        for c in co.run.clients
    ]
    replies = exchange(grid, messages, co.opts.timeout)
    final = co.journal["final"] = {
        "keep_heads_local": co.opts.keep_heads_local,
        "received": {},
        "heads": {},
    }
    for i, c in enumerate(co.run.clients):
        reply = replies.get(i)
        if reply is None or reply.has_error():
            why = "no reply" if reply is None else reply.error.reason
            raise RuntimeError(
                f"site {c.name} did not finish ({why}); its head is still on its node: run again "
                "with resume=true to collect it"
            )
        final["received"][c.name] = array_keys(reply.content)
        if co.opts.keep_heads_local:
            final["heads"][c.name] = str(reply.content["site"]["path"])
            continue
        local = from_record(reply.content["local"])
        expected = local_keys(c.model_state, co.run.keys)
        if sorted(local) != sorted(expected):
            raise RuntimeError(
                f"site {c.name} sent {sorted(local)[:3]}..., not its {len(expected)} local keys"
            )
        c.model_state = {
            k: c.model_state[k] if k in co.run.keys else local[k] for k in c.model_state
        }


def save_server(co: Coordinator, rounds_done: int) -> None:
    """The server's state after a round (what a resumed run needs from the server; each node
    keeps its own) and the journal of what it received (flower.json)."""
    run = co.run
    os.makedirs(co.opts.out, exist_ok=True)
    save_torch_atomic(
        {
            "format": SERVER_FORMAT,
            "round": rounds_done,
            "tag": co.tag,
            "settings": co.key,
            "shared": co.shared,
            "weights": {c.name: c.weight for c in run.clients},
            "history": {c.name: list(c.history) for c in run.clients},
            "counted": dict(co.counted),
            "log": list(run.log),
            "norms": list(run.norms),
            "journal": co.journal,
            "generators": {k: g.get_state() for k, g in co.run.ext.generators.items()},
        },
        os.path.join(co.opts.out, SERVER_STATE),
    )
    write_json_atomic(os.path.join(co.opts.out, EXCHANGE_LOG), co.journal)


def resume_server(co: Coordinator) -> int:
    """Load the server's state (resume=true); returns the rounds already done (0: fresh start)."""
    path = os.path.join(co.opts.out, SERVER_STATE)
    if not os.path.exists(path):
        print(f"resume: no {path}, starting afresh")
        return 0
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != SERVER_FORMAT or blob["settings"] != co.key:
        raise RuntimeError(f"{path}: not a state of this run's settings; not resuming from it")
    if blob["round"] > co.cfg.rounds:
        raise RuntimeError(f"{path}: {blob['round']} rounds done, more than rounds={co.cfg.rounds}")
    co.tag, co.journal, co.counted = blob["tag"], blob["journal"], dict(blob["counted"])
    for c in co.run.clients:
        c.model_state.update(blob["shared"])
        c.history, c.weight = list(blob["history"][c.name]), blob["weights"][c.name]
    co.run.log[:], co.run.norms[:] = blob["log"], blob["norms"]
    for k, g in co.run.ext.generators.items():
        g.set_state(blob["generators"][k])
    print(f"resuming {path} after round {blob['round']}/{co.cfg.rounds}")
    return int(blob["round"])


def server_test_set(cfg: Config) -> tuple[list[Case], dict]:
    """The fully labelled test set, on the server's machine: the phantom's, or data-root's."""
    try:
        _, test, info = load_federation(cfg, sites=())
    except DataError as e:
        raise RuntimeError(str(e)) from None
    return test, info


def keep_representation(co: Coordinator) -> None:
    """keep-heads-local: the server's result is the shared representation alone."""
    path = os.path.join(co.opts.out, "representation.pt")
    save_torch_atomic(
        {
            "format": "segviz-flower-representation/1",
            "mode": co.cfg.mode,
            "fedbn": co.cfg.fedbn,
            "unet": co.run.unet_cfg.to_dict(),
            "shared_keys": list(co.run.keys),
            "state": co.shared,
        },
        path,
    )
    heads = co.journal["final"]["heads"]
    print(f"shared representation: {path}; each site kept its head on its node: "
          + "; ".join(f"{s}: {p}" for s, p in heads.items()))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The whole run: size the federation, discover the sites, train the rounds, assemble,
    test and save."""
    t_start = time.time()
    opts = options(context.run_config)
    server_config(context.run_config, opts)  # settings train.py refuses stop here, before any node
    run_config = sized(context.run_config, simulation_size(grid, opts))
    cfg = server_config(run_config, opts)
    co = coordinator(cfg, opts, variant_of(run_config))
    test_cases, data_info = (
        ([], {}) if opts.keep_heads_local or not cfg.test else server_test_set(cfg)
    )
    t_data = time.time()
    start = resume_server(co) if opts.resume else 0
    discover(grid, co)
    print(
        f"{cfg.mode} over Flower: {cfg.rounds} rounds x {cfg.local_steps} local steps | "
        f"{len(co.run.keys)}/{len(co.run.clients[0].model_state)} keys shared | out "
        f"{os.path.abspath(opts.out)}",
        flush=True,
    )
    for r in range(start, cfg.rounds):
        t_round = time.time()
        line = one_round(grid, co, r)
        print(f"{line}  ({time.time() - t_round:.1f} s)", flush=True)
        save_server(co, r + 1)
    collect(grid, co)
    save_server(co, cfg.rounds)
    if opts.keep_heads_local:
        keep_representation(co)
        return
    train.finish(co.run, test_cases, data_info, (t_start, t_data, time.time()))
