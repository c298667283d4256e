"""Plug-ins for the federated round: screening updates, robust aggregation, differential privacy
and clients that drop out. None of them is part of SegViz itself; each is a function passed
into `fl.federated_round` (or used by a server that receives updates over a network).

    combine = robust.combiner(robust.median, guard=robust.Guard(), privacy=None)
    fl.federated_round(model, optimizer, clients, steps, keys, combine)

A `Guard` refuses updates with NaN/inf or an outlying norm; `Privacy` clips each update and
adds Gaussian noise to the aggregate (DP-FedAvg style); aggregation is the (weighted) mean, or
the coordinate-wise median or trimmed mean. `present` draws who takes part in a round.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fl import Client, Combine, Notes, State, average


def median(states: Sequence[State], weights: Sequence[float] | None = None) -> State:
    """Coordinate-wise median (the mean of the two middle values for an even count).

    Robust to a minority of arbitrary updates; ignores weights."""
    return _order_statistic(states, lambda s, n: (s[(n - 1) // 2] + s[n // 2]) / 2)


def trimmed_mean(
    states: Sequence[State], weights: Sequence[float] | None = None, trim: float = 0.2
) -> State:
    """Coordinate-wise mean after dropping the `trim` share of highest and lowest values
    (at least one each side from three clients on); ignores weights."""
    def middle(s: torch.Tensor, n: int) -> torch.Tensor:
        k = max(int(trim * n), 1 if n >= 3 else 0)
        return s[k:n - k].mean(dim=0)
    return _order_statistic(states, middle)


def _order_statistic(
    states: Sequence[State], pick: Callable[[torch.Tensor, int], torch.Tensor]
) -> State:
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
        bad = next(
            (k for k, v in s.items() if v.is_floating_point() and not torch.isfinite(v).all()), None
        )
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
                refused[i] = (
                    f"update norm {n:.3g} > {guard.factor:g} x median of the others ({others:.3g})"
                )
    return refused


def clip_update(state: State, reference: State, clip: float) -> State:
    """reference + the update scaled down to norm `clip` (unchanged if already within it)."""
    scale = min(1.0, clip / max(update_norm(state, reference), 1e-12))
    return {k: (reference[k] + (v - reference[k]) * scale) if v.is_floating_point() else v
            for k, v in state.items()}


def add_noise(state: State, std: float, generator: torch.Generator) -> State:
    return {k: v + torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) * std
            if v.is_floating_point() else v for k, v in state.items()}


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


def combiner(
    aggregate: Aggregate = average, guard: Guard | None = None, privacy: Privacy | None = None
) -> Combine:
    """A combining function for `fl.federated_round`: screen, clip, aggregate, add noise."""

    def combine(
        sent: Sequence[State], reference: State, weights: Sequence[float] | None = None
    ) -> tuple[State, Notes]:
        merged, norms, refused = combine_updates(
            sent, reference, aggregate, weights, guard, privacy
        )
        return merged, {"norms": norms, "refused": refused}

    return combine


def present(clients: Sequence[Client], p: float, generator: torch.Generator) -> list[Client]:
    """Who takes part this round: each client independently, with probability 1 - p."""
    draw = torch.rand(len(clients), generator=generator)
    return [c for c, u in zip(clients, draw.tolist()) if u >= p]
