"""A transport-free, in-process federated loop over plain state dicts.

Each client is plain data: its model weights, its optimiser state, and a way to draw a
training batch. One live model and optimiser on the device are loaded with a client's state,
trained for some local steps, and the state is stored back; so simulating N clients costs N
state dicts, not N models with activations.

After every client has trained, `federated_round` hands the aggregation function exactly the
tensors named by `shared_keys`, nothing else, and writes its result back into every client.
This module knows nothing of organs or of which keys are shared: the caller says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
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


def snapshot(module: nn.Module) -> State:
    """A detached copy of a module's state dict (a state dict alone aliases live weights)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def new_client(name: str, model: nn.Module, optimizer: torch.optim.Optimizer, next_batch, loss_fn,
               weight: float = 1.0) -> Client:
    """A client starting from the model's current weights and a fresh optimiser state."""
    return Client(name, snapshot(model), copy.deepcopy(optimizer.state_dict()), next_batch, loss_fn, weight)


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
    client.model_state = snapshot(model)
    client.optim_state = copy.deepcopy(optimizer.state_dict())
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


Aggregate = Callable[[Sequence[State], Sequence[float] | None], State]


def federated_round(model: nn.Module, optimizer: torch.optim.Optimizer, clients: Sequence[Client],
                    local_steps: int, shared_keys: Sequence[str], aggregate: Aggregate = average,
                    weighted: bool = False, progress: Callable[[], None] | None = None,
                    lr: float | None = None) -> dict[str, float]:
    """One round: local training at every client, then aggregation of the shared keys only.

    The aggregation function receives, per client, a dict holding only `shared_keys`; its
    result is copied into every client's weights. Returns each client's mean local loss.
    """
    losses = {c.name: local_train(model, optimizer, c, local_steps, progress, lr) for c in clients}
    if shared_keys:
        exchanged = [{k: c.model_state[k] for k in shared_keys} for c in clients]
        merged = aggregate(exchanged, [c.weight for c in clients] if weighted else None)
        for c in clients:
            for k in shared_keys:
                c.model_state[k] = merged[k].clone()
    return losses
