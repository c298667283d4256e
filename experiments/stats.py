"""Statistics that match how the results were made: the trained model (the seed) is the unit of
replication, and the test cases are nested within it.

A comparison of two setups is paired: both were trained with the same seeds, and a seed draws
the same phantom test cases for every setup, so each (seed, case) has a value for both. The
difference of their means comes with a 95 % interval from a hierarchical bootstrap: resample the
seeds with replacement, then the cases within each resampled seed, and take the mean paired
difference. Its two-sided p-value is twice the smaller tail of the bootstrap distribution beyond
zero. Across the comparisons of one table the p-values are adjusted by Holm's step-down method.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP = 10_000
ALPHA = 0.05


class Mismatch(ValueError):
    """Two rows whose (seed, case) pairs are not the same: they cannot be compared pairwise."""


def paired_differences(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]
                       ) -> list[np.ndarray]:
    """Per seed, the differences a - b of every case, matched by (seed, case name); the seeds and
    each seed's cases must be the same in both. Values that are undefined (None, nan) in either
    are left out of their seed, as they are of the means."""
    if sorted(a) != sorted(b):
        raise Mismatch(f"seeds {sorted(a)} and {sorted(b)} differ")
    out = []
    for seed in sorted(a):
        if sorted(a[seed]) != sorted(b[seed]):
            raise Mismatch(f"seed {seed}: test cases {sorted(a[seed])} and {sorted(b[seed])} "
                           "differ")
        d = [a[seed][c] - b[seed][c] for c in sorted(a[seed])
             if a[seed][c] is not None and b[seed][c] is not None
             and np.isfinite(a[seed][c]) and np.isfinite(b[seed][c])]
        if d:
            out.append(np.asarray(d, float))
    return out


def hierarchical_bootstrap(per_seed: Sequence[np.ndarray], repeats: int = BOOTSTRAP,
                           seed: int = 0) -> np.ndarray:
    """`repeats` bootstrap means: seeds resampled with replacement, then the values within each
    resampled seed, each seed's mean weighing alike (as the mean over seeds of each seed's mean)."""
    rng = np.random.default_rng(seed)
    n = len(per_seed)
    picks = rng.integers(0, n, size=(repeats, n))  # the seeds of each resample
    # every seed's cases resampled afresh for each (resample, position) it may be picked for
    case_means = np.stack([values[rng.integers(0, len(values), size=(repeats, n, len(values)))]
                           .mean(axis=2) for values in per_seed])  # (seeds, repeats, n)
    chosen = np.take_along_axis(case_means, picks[None], axis=0)[0]  # (repeats, n)
    return chosen.mean(axis=1)


def compare(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]],
            repeats: int = BOOTSTRAP) -> dict:
    """a - b: the difference of the means over seeds, its 95 % interval and its two-sided p."""
    per_seed = paired_differences(a, b)
    if not per_seed:
        return {"difference": None, "low": None, "high": None, "p": None, "seeds": 0}
    difference = float(np.mean([d.mean() for d in per_seed]))
    boot = hierarchical_bootstrap(per_seed, repeats)
    low, high = np.percentile(boot, [2.5, 97.5])
    tail = min(np.mean(boot <= 0), np.mean(boot >= 0))
    p = float(min(1.0, max(2 * tail, 1 / repeats)))
    if np.all(boot == 0):
        p = 1.0
    return {"difference": difference, "low": float(low), "high": float(high), "p": p,
            "seeds": len(per_seed)}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: not tested, left as it is)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = list(p_values)
    running = 0.0
    m = len(tested)
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def mark(p_adjusted: float | None) -> str:
    """The table's mark of an adjusted p-value: * below ALPHA, else nothing."""
    return "*" if p_adjusted is not None and p_adjusted < ALPHA else ""
