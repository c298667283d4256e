"""A transport-free, in-process federated loop over plain state dicts.

Each client is plain data: its model weights, its optimiser state, and a way to draw a
training batch. One live model and optimiser on the device are loaded with a client's state,
trained for some local steps, and the state is stored back; so simulating N clients costs N
state dicts, not N models with activations.

After every client present has trained, `federated_round` hands the aggregation function
exactly the tensors named by `shared_keys`, nothing else, and writes its result back into
every client. On the way, a `Guard` refuses updates with NaN/inf or an outlying norm, and an
optional `Privacy` clips each update and adds Gaussian noise (DP-FedAvg style). Aggregation is
the (weighted) mean, or the coordinate-wise median or trimmed mean.

This module knows nothing of organs or of which keys are shared: the caller says so.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

State = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Client:
    name: str
    model_state: State
    optim_state: dict
    next_batch: Callable[[], Batch]  # draws one training batch on the training device
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weight: float = 1.0  # for sample-weighted averaging (e.g. number of training cases)
    history: list[float] = field(default_factory=list)  # mean local loss per round


def snapshot(module: nn.Module, store: torch.device | str | None = None) -> State:
    """A detached copy of a module's state dict (a state dict alone aliases live weights),
    kept on `store` (default: where the module is)."""
    return {k: v.detach().to(store, copy=True) if store is not None else v.detach().clone()
            for k, v in module.state_dict().items()}


def stored(obj, store: torch.device | str):
    """A copy of an optimiser state dict with every tensor on `store`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(store, copy=True)
    if isinstance(obj, dict):
        return {k: stored(v, store) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(stored(v, store) for v in obj)
    return copy.deepcopy(obj)


def new_client(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, next_batch, loss_fn,
               weight: float = 1.0, store: torch.device | str | None = None) -> Client:
    """A client starting from the model's current weights and a fresh optimiser state, both
    kept on `store` (default: the model's device; see `choose_store`)."""
    store = store if store is not None else next(model.parameters()).device
    return Client(name, snapshot(model, store), stored(optimizer.state_dict(), store), next_batch, loss_fn, weight)


def state_bytes(model: nn.Module) -> int:
    """What one client's stored state costs: weights and buffers, plus Adam's two moments."""
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return weights + 2 * sum(p.numel() * p.element_size() for p in model.parameters())


def choose_store(device: torch.device, clients: int, per_client: int, share: float = 0.5) -> torch.device:
    """Where to keep the clients' states: on the training device if they all fit in `share` of
    its free memory (no copies each round), else in host memory. On a CPU that is the same."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if clients * per_client <= share * free else torch.device("cpu")


def local_train(model: nn.Module, optimizer: torch.optim.Optimizer, client: Client, steps: int,
                progress: Callable[[], None] | None = None, lr: float | None = None) -> float:
    """Load the client into the live model, take `steps` optimiser steps, store it back.

    `lr`, when given, replaces the learning rate stored with the client's optimiser state
    (a schedule set by the caller). Returns the mean training loss over the steps.
    """
    model.load_state_dict(client.model_state)
    optimizer.load_state_dict(client.optim_state)
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    model.train()
    total = torch.zeros((), device=next(model.parameters()).device)
    for _ in range(steps):
        x, y = client.next_batch()
        loss = client.loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        if progress is not None:
            progress()
    store = next(iter(client.model_state.values())).device
    client.model_state = snapshot(model, store)
    client.optim_state = stored(optimizer.state_dict(), store)
    mean = float(total) / max(steps, 1)
    client.history.append(mean)
    return mean


def average(states: Sequence[State], weights: Sequence[float] | None = None) -> State:
    """Weighted mean of each key across states (unweighted when weights is None).

    Integer buffers (e.g. BatchNorm's batch counter) are averaged in float and rounded back.
    """
    if not states:
        raise ValueError("nothing to average")
    w = torch.tensor([1.0] * len(states) if weights is None else list(weights), dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for key in states[0]:
        stacked = torch.stack([s[key].double() for s in states])
        mean = torch.tensordot(w.to(stacked.device), stacked, dims=1)
        ref = states[0][key]
        out[key] = (mean.round() if not ref.is_floating_point() else mean).to(ref.dtype)
    return out


def median(states: Sequence[State], weights: Sequence[float] | None = None) -> State:
    """Coordinate-wise median (the mean of the two middle values for an even count).

    Robust to a minority of arbitrary updates; ignores weights."""
    return _order_statistic(states, lambda s, n: (s[(n - 1) // 2] + s[n // 2]) / 2)


def trimmed_mean(states: Sequence[State], weights: Sequence[float] | None = None, trim: float = 0.2) -> State:
    """Coordinate-wise mean after dropping the `trim` share of highest and lowest values
    (at least one each side from three clients on); ignores weights."""
    def middle(s, n):
        k = max(int(trim * n), 1 if n >= 3 else 0)
        return s[k:n - k].mean(dim=0)
    return _order_statistic(states, middle)


def _order_statistic(states: Sequence[State], pick) -> State:
    if not states:
        raise ValueError("nothing to aggregate")
    out = {}
    for key in states[0]:
        ref = states[0][key]
        s = torch.stack([x[key].double() for x in states]).sort(dim=0).values
        value = pick(s, len(states))
        out[key] = (value.round() if not ref.is_floating_point() else value).to(ref.dtype)
    return out


AGGREGATORS = {"mean": average, "median": median, "trimmed-mean": trimmed_mean}
Aggregate = Callable[[Sequence[State], Sequence[float] | None], State]


# ---------------------------------------------------------------------------------------
# Guarding the exchange: screening updates, and optional differential privacy
# ---------------------------------------------------------------------------------------


@dataclass
class Guard:
    """Which updates (a client's shared weights minus last round's) are refused.

    Always: any NaN or inf. With `max_norm`: a norm above it. Otherwise, with `factor`: a
    norm above `factor` times the median norm of the other clients' updates (a scale-free
    rule; it needs no tuning to the model's size, and a single client is never refused by it).
    """

    max_norm: float | None = None
    factor: float | None = 10.0


@dataclass
class Privacy:
    """DP-FedAvg-style noise on the shared update: each client's update is clipped to norm
    `clip`, and Gaussian noise of std `noise * clip` is added to the aggregated update.

    Not a formal privacy guarantee on its own: no accountant tracks the privacy budget."""

    clip: float
    noise: float
    generator: torch.Generator


def update_norm(state: State, reference: State) -> float:
    """L2 norm over every floating-point key of state - reference."""
    total = 0.0
    for k, v in state.items():
        if v.is_floating_point():
            total += float(((v.double() - reference[k].double()) ** 2).sum())
    return math.sqrt(total)


def screen(states: Sequence[State], norms: Sequence[float], guard: Guard) -> dict[int, str]:
    """Index -> reason for every update the guard refuses (norms: each update's L2 norm)."""
    refused = {}
    for i, s in enumerate(states):
        bad = next((k for k, v in s.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            refused[i] = f"NaN or inf in {bad}"
    norms = {i: n for i, n in enumerate(norms) if i not in refused}
    for i, n in norms.items():
        if guard.max_norm is not None:
            if n > guard.max_norm:
                refused[i] = f"update norm {n:.3g} > --max-update-norm {guard.max_norm:g}"
        elif guard.factor is not None and len(norms) > 1:
            others = statistics.median(v for j, v in norms.items() if j != i)
            if n > guard.factor * others:
                refused[i] = f"update norm {n:.3g} > {guard.factor:g} x median of the others ({others:.3g})"
    return refused


def clip_update(state: State, reference: State, clip: float) -> State:
    """reference + the update scaled down to norm `clip` (unchanged if already within it)."""
    scale = min(1.0, clip / max(update_norm(state, reference), 1e-12))
    return {k: (reference[k] + (v - reference[k]) * scale) if v.is_floating_point() else v
            for k, v in state.items()}


def add_noise(state: State, std: float, generator: torch.Generator) -> State:
    return {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) * std
            if v.is_floating_point() else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------
# One round
# ---------------------------------------------------------------------------------------


def combine_updates(sent: Sequence[State], reference: State, aggregate: Aggregate = average,
                    weights: Sequence[float] | None = None, guard: Guard | None = None,
                    privacy: Privacy | None = None) -> tuple[State, list[float], dict[int, str]]:
    """The new shared weights from the states the clients sent (each holding only the shared
    keys), with each update's norm and the refused ones (index -> why).

    `reference` is last round's shared state, what every client started from. Refused updates
    are left out; if every update is refused, the result is the reference. Used by
    `federated_round` here and by a server that receives the states over a network.
    """
    norms = [update_norm(s, reference) for s in sent]
    refused = screen(sent, norms, guard) if guard is not None else {}
    accepted = [i for i in range(len(sent)) if i not in refused]
    if not accepted:
        return reference, norms, refused
    states = [sent[i] for i in accepted]
    if privacy is not None:
        states = [clip_update(s, reference, privacy.clip) for s in states]
    merged = aggregate(states, [weights[i] for i in accepted] if weights is not None else None)
    if privacy is not None:
        merged = add_noise(merged, privacy.noise * privacy.clip, privacy.generator)
    return merged, norms, refused


@dataclass
class RoundReport:
    losses: dict[str, float]  # mean local loss of each client that trained
    absent: list[str]  # clients that did not take part
    refused: dict[str, str]  # clients whose update was not aggregated, and why
    norms: dict[str, float]  # L2 norm of each present client's update to the shared weights


def federated_round(model: nn.Module, optimizer: torch.optim.Optimizer, clients: Sequence[Client],
                    local_steps: int | Mapping[str, int], shared_keys: Sequence[str], aggregate: Aggregate = average,
                    weighted: bool = False, progress: Callable[[], None] | None = None,
                    lr: float | None = None, present: Sequence[Client] | None = None,
                    guard: Guard | None = None, privacy: Privacy | None = None) -> RoundReport:
    """One round: local training at the clients present, then aggregation of the shared keys.

    `local_steps`: optimiser steps of every client, or of each client by name.
    The aggregation function receives, per accepted client, a dict holding only `shared_keys`;
    its result is copied into every client's weights (absent clients receive it when they
    return; they have not trained meanwhile). Every client starts a round with the same shared
    weights, so any client's copy is last round's global state: the reference for updates.
    A round in which nobody is present, or every update is refused, keeps those weights.
    """
    present = list(clients) if present is None else list(present)
    reference = {k: clients[0].model_state[k].clone() for k in shared_keys}
    steps = local_steps if isinstance(local_steps, Mapping) else dict.fromkeys((c.name for c in clients), local_steps)
    losses = {c.name: local_train(model, optimizer, c, steps[c.name], progress, lr) for c in present}
    report = RoundReport(losses, [c.name for c in clients if all(c is not p for p in present)], {}, {})
    if not shared_keys or not present:
        return report
    sent = [{k: c.model_state[k] for k in shared_keys} for c in present]
    merged, norms, refused = combine_updates(sent, reference, aggregate,
                                             [c.weight for c in present] if weighted else None, guard, privacy)
    report.norms = {c.name: n for c, n in zip(present, norms)}
    report.refused = {present[i].name: why for i, why in refused.items()}
    for c in clients:
        for k in shared_keys:
            c.model_state[k] = merged[k].clone()
    return report
