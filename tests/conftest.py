"""Shared pytest setup: import the flat modules at the repository root."""

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# One intra-op thread: on a small shared machine a second thread mostly waits for a busy core
# (phantom generation measured ~0.5 s with one thread against ~8 s with two under load).
torch.set_num_threads(1)
