"""A transport-free, in-process federated loop over plain state dicts.

Each client is plain data: its model weights, its optimiser state, and a way to draw a
training batch. One live model and optimiser on the device are loaded with a client's state,
trained for some local steps, and the state is stored back; so simulating N clients costs N
state dicts, not N models with activations.

After every client present has trained, `federated_round` hands the combining function
exactly the tensors named by `shared_keys`, nothing else, and writes its result back into
every client. The default is the plain (optionally weighted) mean; screening updates, robust
aggregation and differential privacy are combining functions passed in (robust.py), and who
takes part in a round is a list the caller passes.

This module knows nothing of organs or of which keys are shared: the caller says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from common import autocast

State = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
_T = TypeVar("_T")


@dataclass
class Client:
    name: str
    model_state: State
    optim_state: dict
    next_batch: Callable[[], Batch]  # draws one training batch on the training device
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    weight: float = 1.0  # for sample-weighted averaging (e.g. number of training cases)
    history: list[float] = field(default_factory=list)  # mean local loss per round
    # told the client as it starts a round of local training, before the first step (ConDistFL
    # keeps the weights it starts from, the global model's, as the teacher of its loss)
    begin: Callable[[Client], None] | None = None
    # mixed precision (--amp): the type the forward pass computes in (None: float32), and for
    # float16 the site's gradient scaler (the scale is local state, like the optimiser's)
    amp: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None


def snapshot(module: nn.Module, store: torch.device | str | None = None) -> State:
    """A detached copy of a module's state dict (a state dict alone aliases live weights),
    kept on `store` (default: where the module is)."""
    return {k: v.detach().to(store, copy=True) if store is not None else v.detach().clone()
            for k, v in module.state_dict().items()}


def stored(obj: _T, store: torch.device | str) -> _T:
    """A copy of an optimiser state dict with every tensor on `store`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(store, copy=True)
    if isinstance(obj, dict):
        return {k: stored(v, store) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(stored(v, store) for v in obj)
    return copy.deepcopy(obj)


def new_client(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    next_batch: Callable[[], Batch],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weight: float = 1.0,
    store: torch.device | str | None = None,
    amp: torch.dtype | None = None,
) -> Client:
    """A client starting from the model's current weights and a fresh optimiser state, both
    kept on `store` (default: the model's device; see `choose_store`). `amp`: the type of its
    forward pass under mixed precision (float16 brings a gradient scaler)."""
    device = next(model.parameters()).device
    store = store if store is not None else device
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    return Client(name, snapshot(model, store), stored(optimizer.state_dict(), store), next_batch,
                  loss_fn, weight, amp=amp, scaler=scaler)


def state_bytes(model: nn.Module) -> int:
    """What one client's stored state costs: weights and buffers, plus Adam's two moments."""
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return weights + 2 * sum(p.numel() * p.element_size() for p in model.parameters())


def choose_store(
    device: torch.device, clients: int, per_client: int, share: float = 0.5
) -> torch.device:
    """Where to keep the clients' states: on the training device if they all fit in `share` of
    its free memory (no copies each round), else in host memory. On a CPU that is the same."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if clients * per_client <= share * free else torch.device("cpu")


def local_train(model: nn.Module, optimizer: torch.optim.Optimizer, client: Client, steps: int,
                progress: Callable[[], None] | None = None) -> float:
    """Load the client into the live model, take `steps` optimiser steps, store it back.

    The learning rate is the one stored with the client's optimiser state. Returns the mean
    training loss over the steps.
    """
    if client.begin is not None:
        client.begin(client)
    model.load_state_dict(client.model_state)
    optimizer.load_state_dict(client.optim_state)
    model.train()
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = client.next_batch()
        with autocast(device, client.amp):
            out = model(x)
        loss = client.loss_fn(out.float(), y)  # the loss's sums in float32 whatever the pass
        optimizer.zero_grad(set_to_none=True)
        if client.scaler is None:
            loss.backward()
            optimizer.step()
        else:  # float16: gradients scaled up so that small ones do not vanish, steps unscaled
            client.scaler.scale(loss).backward()
            client.scaler.step(optimizer)
            client.scaler.update()
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


# ---------------------------------------------------------------------------------------
# One round
# ---------------------------------------------------------------------------------------


Notes = dict  # what a combining function reports: {"refused": {index: why}, "norms": [per update]}
Combine = Callable[[Sequence[State], State, Sequence[float] | None], tuple[State, Notes]]


def mean(
    sent: Sequence[State], reference: State, weights: Sequence[float] | None = None
) -> tuple[State, Notes]:
    """The default way to combine the clients' shared weights: their (weighted) mean."""
    return average(sent, weights), {}


@dataclass
class RoundReport:
    losses: dict[str, float]  # mean local loss of each client that trained
    absent: list[str]  # clients that did not take part
    refused: dict[str, str]  # clients whose update was not combined, and why (robust.py's guard)
    # L2 norm of each present client's update, where the combining function measures it
    norms: dict[str, float]


def federated_round(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    clients: Sequence[Client],
    local_steps: int | Mapping[str, int],
    shared_keys: Sequence[str],
    combine: Combine = mean,
    weighted: bool = False,
    progress: Callable[[], None] | None = None,
    present: Sequence[Client] | None = None,
) -> RoundReport:
    """One round: local training at the clients present, then the shared keys combined.

    `local_steps`: optimiser steps of every client, or of each client by name. `combine`
    receives, per present client, a dict holding only `shared_keys`, and last round's shared
    state (what every client started from); its result is copied into every client's weights
    (absent clients receive it when they return; they have not trained meanwhile). A round in
    which nobody is present keeps the weights.
    """
    present = list(clients) if present is None else list(present)
    reference = {k: clients[0].model_state[k].clone() for k in shared_keys}
    if isinstance(local_steps, Mapping):
        steps = local_steps
    else:
        steps = dict.fromkeys((c.name for c in clients), local_steps)
    losses = {c.name: local_train(model, optimizer, c, steps[c.name], progress) for c in present}
    absent = [c.name for c in clients if all(c is not p for p in present)]
    report = RoundReport(losses, absent, {}, {})
    if not shared_keys or not present:
        return report
    sent = [{k: c.model_state[k] for k in shared_keys} for c in present]
    merged, notes = combine(sent, reference, [c.weight for c in present] if weighted else None)
    report.norms = {c.name: n for c, n in zip(present, notes.get("norms", []))}
    report.refused = {present[i].name: why for i, why in notes.get("refused", {}).items()}
    for c in clients:
        for k in shared_keys:
            c.model_state[k] = merged[k].clone()
    return report
