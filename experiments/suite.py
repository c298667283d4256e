"""`python -m experiments suite`: every setup of the paper's figure 2 (and SegViz with FedBN,
the marginal-loss baselines and the oracle) for every node count and seed, each as its own
train.py (or `python -m experiments train`) process writing DIR/<setup>-<nodes>/seed-S. A
finished run is skipped and an unfinished one resumed, so the command can simply be issued again;
then the runs are compared (compare.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from common import fail
from experiments.compare import compare_runs

# the paper's figure 2, SegViz with FedBN, the stronger baselines and the upper bound: (name stem,
# the flags of its run); the last three are variants that `experiments.py train` runs
SETUPS = (
    ("single", ["--mode", "single"]),
    ("central", ["--mode", "central"]),
    ("central-marginal", ["--mode", "central", "--marginal"]),
    ("fedavg", ["--mode", "fedavg"]),
    ("fedavg-marginal", ["--mode", "fedavg", "--marginal"]),
    ("segviz", ["--mode", "segviz"]),
    ("segviz-fedbn", ["--mode", "segviz", "--fedbn"]),
    ("oracle", ["--mode", "central", "--oracle"]),
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
VARIANT_FLAGS = ("--marginal", "--oracle")


def script_of(flags: Sequence[str]) -> list[str]:
    """The command that trains a setup: train.py, or python -m experiments train for a variant."""
    if any(f in VARIANT_FLAGS for f in flags):
        return [sys.executable, "-m", "experiments", "train"]
    return [sys.executable, os.path.join(ROOT, "train.py")]


def checkout_env() -> dict[str, str]:
    """The environment of a run the suite starts: the checkout importable from any folder."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}


def suite_plan(out: str, nodes: Sequence[int], seeds: Sequence[int], passed: list[str],
               real: bool) -> list[tuple[str, str, list[str]]]:
    """(setup name, its folder, its flags) of every run of the suite. The user's other flags
    apply to every run; each setup's own flags come after them."""
    plan = []
    for n in nodes:
        for stem, flags in SETUPS:
            if (stem == "oracle" and real) or (stem != "single" and n == 1):
                continue
            for seed in seeds:
                folder = os.path.join(out, f"{stem}-{n}", f"seed-{seed}") if len(seeds) > 1 else \
                    os.path.join(out, f"{stem}-{n}")
                plan.append(
                    (
                        f"{stem}-{n}",
                        folder,
                        [*passed, "--nodes", str(n), *flags, "--seeds", str(seed), "--out", folder],
                    )
                )
    return plan


def run_suite(out: str, nodes: Sequence[int], seeds: Sequence[int], passed: list[str]) -> int:
    """Every run of the suite that has not finished, then the comparison."""
    real = any(a == "--data-root" or a.startswith(("--data-root=", "--data")) for a in passed)
    plan = suite_plan(out, nodes, seeds, passed, real)
    device = [
        a
        for i, a in enumerate(passed)
        if a.startswith("--device") or (i and passed[i - 1] == "--device")
    ]
    print(f"suite: {len(plan)} runs under {out}")
    for i, (name, folder, argv) in enumerate(plan, 1):
        seed = argv[argv.index("--seeds") + 1]
        command = script_of(argv)
        if os.path.exists(os.path.join(folder, "metrics.json")):
            print(f"[{i}/{len(plan)}] {name} seed {seed}: finished, skipped")
            continue
        if os.path.exists(os.path.join(folder, "state.pt")):
            print(f"[{i}/{len(plan)}] {name} seed {seed}: resuming")
            argv = ["--resume", folder, *device]
        else:
            print(f"[{i}/{len(plan)}] {name} seed {seed}")
        result = subprocess.run([*command, *argv], check=False, env=checkout_env())
        if result.returncode != 0:
            fail(
                f"suite: {name} seed {seed} stopped (exit {result.returncode}); issue the command "
                "again to go on"
            )
    print(compare_runs(out))
    return 0
