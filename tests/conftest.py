"""Shared pytest setup: the flat core at the repository root and the wings' packages importable,
tests/ too (its helpers.py), one torch thread, and one phantom cache for the whole session."""

import pathlib
import sys

import pytest
import torch

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(1, str(TESTS))

# One intra-op thread: on a small shared machine a second thread mostly waits for a busy core
# (phantom generation measured ~0.5 s with one thread against ~8 s with two under load).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """The phantom's cases, generated once for every end-to-end run of the session."""
    return tmp_path_factory.mktemp("cache")
