"""Where a run's cases come from: the built-in phantom (phantom.py), or real data.

Real data (archive layouts, NIfTI, preprocessing and its cache) lives in the `realdata/` wing,
which the core never imports at the top: `real_data()` is the one place where it reaches it,
and only when a run names real data (--data-root, --data). The main command on the phantom
imports none of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

from data import NODE_SITES, Case
from phantom import PhantomSpec, phantom_federation, phantom_validation
from settings import Config, is_real

PHANTOM_VALIDATION = 4  # validation cases a phantom site draws (other patients, scanned alike)


def real_data() -> ModuleType:
    """The real-data wing, `realdata.federation`: the one import of a wing by the core."""
    import realdata.federation

    return realdata.federation


def workers() -> int:
    """Processes that preprocess real data (each reads and resamples whole scans)."""
    return min(4, os.cpu_count() or 1)


def phantom_spec(cfg: Config) -> PhantomSpec:
    """The phantom's size on the working grid: cases per site (capped by --max-cases and
    --train-cases) and in the test set (capped by --max-cases)."""
    cases = dict(PhantomSpec().cases)
    for name, n in cases.items():
        caps = [cfg.max_cases, None if name == "test" else cfg.train_cases]
        cases[name] = min([n, *(c for c in caps if c)])
    return PhantomSpec(cases=cases, spacing=cfg.spacing)


def load_federation(cfg: Config, full_labels: bool = False, sites: Sequence[str] | None = None
                    ) -> tuple[dict[str, list[Case]], list[Case], dict]:
    """Each site's training cases, the fully labelled test set, and a note of where they came
    from. `full_labels` (phantom only) labels every organ at every site: the oracle. `sites`:
    these sites' cases only (default: the federation's; none: the test set alone)."""
    sites = NODE_SITES[cfg.nodes] if sites is None else tuple(sites)
    if is_real(cfg):
        train, test, info = real_data().real_federation(sites, cfg, workers())
        return train, test, {"source": "real", **info, "val_split": cfg.val_split}
    train, test = phantom_federation(
        sites, seed=cfg.seed, spec=phantom_spec(cfg), cache_dir=cfg.cache, full_labels=full_labels
    )
    return train, test, {"source": "phantom"}


def load_validation(cfg: Config, phantom_cases: int | None = None) -> dict[str, list[Case]]:
    """Each site's validation cases, labelled as the site labels: real data's held-out split,
    or extra phantom cases (`phantom_cases` of them a site; the first 4 are training's)."""
    sites = NODE_SITES[cfg.nodes]
    if is_real(cfg):
        return real_data().real_validation(sites, cfg, workers())
    n = phantom_cases or min(PHANTOM_VALIDATION, cfg.max_cases or PHANTOM_VALIDATION)
    return phantom_validation(sites, n, seed=cfg.seed, spec=phantom_spec(cfg), cache_dir=cfg.cache)


def load_test_set(cfg: Config) -> list[Case]:
    """The fully labelled test set a run names: the phantom's for its seed, or real data's."""
    if is_real(cfg):
        return real_data().real_test_set(cfg, workers())
    return phantom_federation((), seed=cfg.seed, spec=phantom_spec(cfg), cache_dir=cfg.cache)[1]
