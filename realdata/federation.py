"""A federation of real sites, as cases.py asks for it: each site's training cases (its
validation split held out), its validation cases, and the test set, found under --data-root or
at the paths --data SITE=PATH names, preprocessed at the run's spacing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from data import Case, DataError
from realdata.archives import ORIGINAL_CASES, ORIGINAL_VAL, Pair, Source, find_sources
from realdata.preprocess import check_labelled, load_source
from settings import Config


def split_validation(pairs: list[Pair], site: str, val: str = "auto", seed: int = 0
                     ) -> tuple[list[Pair], list[Pair], str]:
    """Training and validation pairs, and the rule that split them, in words.

    "auto" (settings.resolve makes it "0" for a run that reads no validation cases): the
    original's split when the folder holds the original archive's cases (the last N held out:
    liver 25 of 131, spleen 9 of 41, pancreas 56 of 281, kidneys 42 of 210), else a fifth of
    them (at least one), chosen with the seed; a site of one case trains on it.
    "original": the original's split, whatever the folder holds. A fraction F: round(F * n)
    cases chosen with the seed."""
    n = len(pairs)
    if val == "auto":
        if n == ORIGINAL_CASES[site]:
            val = "original"
        elif n < 2:
            return pairs, [], f"{n} case: too few to hold one out, trains on all, no validation"
        else:
            n_val = max(1, round(0.2 * n))
            train, held = _seeded_split(pairs, n_val, seed)
            return train, held, f"a fifth held out for validation ({n_val} of {n}, seeded)"
    if val == "original":
        n_val = ORIGINAL_VAL[site]
        if n_val >= n:
            raise DataError(
                f"{site}: {n} case(s), but the original split holds out the last {n_val} for "
                f"validation; pass --val-split FRACTION (e.g. 0.2, or 0 for none)"
            )
        return (
            pairs[: n - n_val],
            pairs[n - n_val :],
            f"the original's split (the last {n_val} of {n})",
        )
    n_val = round(float(val) * n)
    if n_val == 0:
        return pairs, [], "every case trains, none held out"
    if n_val >= n:
        raise DataError(
            f"{site}: --val-split {val} would leave none of its {n} case(s) for training"
        )
    train, held = _seeded_split(pairs, n_val, seed)
    return train, held, f"--val-split {val}: {n_val} of {n} held out (seeded)"


def _seeded_split(pairs: list[Pair], n_val: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    held = set(np.random.default_rng(seed).permutation(len(pairs))[:n_val].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [
        p for i, p in enumerate(pairs) if i in held
    ]


def site_split(source: Source, cfg: Config) -> tuple[Source, Source, str]:
    """A site's dataset as its training and its validation part, and the rule, in words. With
    --train-cases N the training part is its first N cases; the validation part stays whole.
    train.py and a Flower site both take their cases from here."""
    keep, held, rule = split_validation(source.pairs, source.role, cfg.val_split, cfg.seed)
    if cfg.train_cases:
        keep = keep[: cfg.train_cases]
    return replace(source, pairs=keep), replace(source, pairs=held), rule


def real_validation(sites: Sequence[str], cfg: Config, workers: int = 1) -> dict[str, list[Case]]:
    """The validation cases each site holds out (the same split as real_federation)."""
    out = {}
    for role, source in find_sources(sites, cfg.data_root, cfg.data).items():
        _, held, _ = site_split(source, cfg)
        out[role] = (
            load_source(held, cfg.spacing, cfg.cache, workers, cfg.max_cases) if held.pairs else []
        )
    return out


def real_federation(sites: Sequence[str], cfg: Config, workers: int = 1
                    ) -> tuple[dict[str, list[Case]], list[Case], dict]:
    """Training cases of each site, the test set, and a record of where they came from."""
    sources = find_sources((*sites, "test"), cfg.data_root, cfg.data)
    train, info = {}, {"roots": {}, "layouts": {}, "validation": {}}
    for role, source in sources.items():
        info["roots"][role] = os.path.abspath(source.root)
        info["layouts"][role] = source.layout
        if role != "test":
            source, held, rule = site_split(source, cfg)
            print(f"{role}: {len(source.pairs)} training case(s); {rule}")
            info["validation"][role] = [p.name for p in held.pairs]
        cases = load_source(source, cfg.spacing, cfg.cache, workers, cfg.max_cases)
        check_labelled(cases, source)
        if role == "test":
            test = cases
        else:
            train[role] = cases
    return train, test, info


def real_test_set(cfg: Config, workers: int = 1) -> list[Case]:
    """The test set alone (a trained model tested again)."""
    source = find_sources(("test",), cfg.data_root, cfg.data)["test"]
    cases = load_source(source, cfg.spacing, cfg.cache, workers, cfg.max_cases)
    check_labelled(cases, source)
    return cases
