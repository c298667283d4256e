"""`python -m experiments suite`: every setup of the paper's figure 2, SegViz with FedBN, the
marginal-loss baselines, ConDistFL and the oracle, for every node count and seed, each as its
own train.py (or `python -m experiments train`) process. A finished run is skipped and an
unfinished one resumed, so the command can simply be issued again; then the runs are compared
(compare.py).

Equal tuning (`--tune-lr`): every setup is trained at each learning rate with the tuning seeds,
without reading the test set, and validated on its sites' own validation cases after the last
round. Per setup, the rate of the highest mean validation Dice over the sites and seeds is kept
(OUT/choices.json, OUT/choices.md); the other seeds are trained at it, and the test set is read
once, by `python eval.py` on the kept runs. `--lr-from OUT/choices.json` trains each setup at
the rate a tuned suite chose for it (for other node counts, the choice at the most nodes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common import fail, write_json_atomic, write_text_atomic
from experiments.compare import CHOICES, compare_runs
from settings import add_arguments, given_of, is_real, resolve

# (name stem, the flags of its run): the paper's figure 2 (A-D), SegViz with FedBN, the
# marginal-loss baselines, ConDistFL and the upper bound; those with a variant flag are
# trained by `python -m experiments train`
SETUPS = (
    ("single", ["--mode", "single"]),
    ("central", ["--mode", "central"]),
    ("central-marginal", ["--mode", "central", "--marginal"]),
    ("fedavg", ["--mode", "fedavg"]),
    ("fedavg-marginal", ["--mode", "fedavg", "--marginal"]),
    ("condistfl", ["--mode", "fedavg", "--condist"]),
    ("segviz", ["--mode", "segviz"]),
    ("segviz-fedbn", ["--mode", "segviz", "--fedbn"]),
    ("oracle", ["--mode", "central", "--oracle"]),
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
VARIANT_FLAGS = ("--marginal", "--condist", "--oracle")


@dataclass
class Job:
    """One run of a suite: its setup's name (stem-nodes), seed, folder and flags."""

    name: str
    stem: str
    seed: int
    folder: str
    argv: list[str]


def script_of(flags: Sequence[str]) -> list[str]:
    """The command that trains a setup: train.py, or python -m experiments train for a variant."""
    if any(f in VARIANT_FLAGS for f in flags):
        return [sys.executable, "-m", "experiments", "train"]
    return [sys.executable, os.path.join(ROOT, "train.py")]


def checkout_env() -> dict[str, str]:
    """The environment of a run the suite starts: the checkout importable from any folder."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}


def settings_of(passed: list[str]) -> argparse.Namespace:
    """The run settings the user's flags give every run of the suite."""
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    return p.parse_known_args(passed)[0]


def setups(nodes: int, real: bool, stems: Sequence[str] | None = None) -> list[tuple[str, list]]:
    """The setups that exist at `nodes` sites (one site: single-site models only; real data: no
    oracle), those of `stems` alone if given."""
    return [(stem, flags) for stem, flags in SETUPS
            if not (stem == "oracle" and real) and not (stem != "single" and nodes == 1)
            and (stems is None or stem in stems)]


def suite_plan(out: str, nodes: Sequence[int], seeds: Sequence[int], passed: list[str],
               real: bool, extra: dict[str, list[str]] | None = None,
               folder_of: dict[str, str] | None = None) -> list[Job]:
    """Every run of a suite. The user's flags apply to every run, each setup's own come after
    them, then `extra[name]` (e.g. its learning rate). A setup's runs go to OUT/<name> (or
    OUT/folder_of[name]), each seed's to seed-S in it, as train.py writes them."""
    plan = []
    for n in nodes:
        for stem, flags in setups(n, real):
            name = f"{stem}-{n}"
            setup_folder = os.path.join(out, (folder_of or {}).get(name, name))
            for seed in seeds:
                argv = [*passed, "--nodes", str(n), *flags, *(extra or {}).get(name, []),
                        "--seeds", str(seed), "--out", setup_folder]
                plan.append(Job(name, stem, seed, os.path.join(setup_folder, f"seed-{seed}"), argv))
    return plan


def run_jobs(jobs: Sequence[Job], what: str = "suite") -> None:
    """Train every job that has not finished, in order; train.py resumes an unfinished one."""
    print(f"{what}: {len(jobs)} runs")
    for i, job in enumerate(jobs, 1):
        head = f"[{i}/{len(jobs)}] {job.name} seed {job.seed}"
        if os.path.exists(os.path.join(job.folder, "metrics.json")):
            print(f"{head}: finished, skipped")
            continue
        resuming = os.path.exists(os.path.join(job.folder, "state.pt"))
        print(f"{head}: resuming" if resuming else head)
        result = subprocess.run([*script_of(job.argv), *job.argv], check=False, env=checkout_env())
        if result.returncode != 0:
            fail(
                f"{what}: {job.name} seed {job.seed} stopped (exit {result.returncode}); issue the "
                "command again to go on"
            )


def read_test_set_once(jobs: Sequence[Job], passed: list[str]) -> None:
    """Score each run trained without the test set on it, once (its eval/ folder)."""
    device = [a for i, a in enumerate(passed)
              if a.startswith("--device") or (i and passed[i - 1] == "--device")]
    for job in jobs:
        if os.path.exists(os.path.join(job.folder, "eval", "metrics.json")):
            continue
        print(f"test set: {job.name} seed {job.seed}")
        argv = [sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint",
                os.path.join(job.folder, "model.pt"), *device]
        if subprocess.run(argv, check=False, env=checkout_env()).returncode != 0:
            fail(f"suite: the test of {job.name} seed {job.seed} stopped; issue the command again")


# ---------------------------------------------------------------------------------------
# Equal tuning: the same search for every setup, on its own validation cases
# ---------------------------------------------------------------------------------------


def lr_folder(lr: float, name: str) -> str:
    return os.path.join("tune", f"lr-{lr:g}", name)


def validation_score(folder: str) -> float | None:
    """A run's last validation: the mean over its sites of each site's validation Dice."""
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        checks = json.load(f).get("validation") or []
    if not checks:
        return None
    return float(np.mean([v for k, v in checks[-1].items() if k != "round"]))


def choose(out: str, names: Sequence[str], lrs: Sequence[float], seeds: Sequence[int]) -> dict:
    """Per setup, the learning rate of the highest mean validation Dice over sites and seeds."""
    table, lr, runs = {}, {}, {}
    for name in names:
        table[name] = {}
        for rate in lrs:
            scores = [validation_score(os.path.join(out, lr_folder(rate, name), f"seed-{s}"))
                      for s in seeds]
            if any(s is None for s in scores):
                fail(f"suite: {name} at lr {rate:g} has no validation score for every seed")
            table[name][f"{rate:g}"] = scores
        best = max(lrs, key=lambda rate: np.mean(table[name][f"{rate:g}"]))
        lr[name], runs[name] = best, lr_folder(best, name)
    return {"lr": lr, "runs": runs, "validation": table, "seeds": list(seeds)}


def choices_table(choices: dict) -> str:
    """The search: each setup's validation Dice (mean over sites) at each rate, mean ± std over
    the tuning seeds (the value alone for one seed); the kept rate in bold."""
    rates = list(next(iter(choices["validation"].values())))
    lines = ["| setup | " + " | ".join(f"lr {r}" for r in rates) + " | kept |",
             "|---|" + "---|" * (len(rates) + 1)]
    for name, by_rate in choices["validation"].items():
        cells = []
        for rate, scores in by_rate.items():
            cell = f"{np.mean(scores):.3f}"
            if len(scores) > 1:  # one tuning seed has no spread to show
                cell += f" ± {np.std(scores, ddof=1):.3f}"
            cells.append(f"**{cell}**" if float(rate) == choices["lr"][name] else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {choices['lr'][name]:g} |")
    return "\n".join(lines)


def lr_from(path: str, name: str) -> float:
    """The learning rate a tuned suite chose for a setup: at its node count, else at the most
    nodes it tuned."""
    try:
        with open(path) as f:
            chosen = json.load(f)["lr"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"--lr-from {path}: not a suite's choices.json ({type(e).__name__})")
    if name in chosen:
        return chosen[name]
    stem = name.rsplit("-", 1)[0]
    same = sorted(
        (int(k.rsplit("-", 1)[1]), v) for k, v in chosen.items() if k.rsplit("-", 1)[0] == stem
    )
    if not same:
        fail(f"--lr-from {path}: no learning rate was chosen for {stem}")
    return same[-1][1]


def run_suite(out: str, nodes: Sequence[int], seeds: Sequence[int], passed: list[str],
              tune_lrs: Sequence[float] = (), tune_seeds: Sequence[int] | None = None,
              lr_path: str | None = None) -> int:
    """Every run of the suite that has not finished, then the comparison."""
    settings = settings_of(passed)
    real = is_real(given_of(settings))
    names = [f"{stem}-{n}" for n in nodes for stem, _ in setups(n, real)]
    if tune_lrs:
        rounds = resolve(given_of(settings)).rounds
        blind = ["--no-test", "--val-every", str(rounds)]
        tune_seeds = list(tune_seeds or seeds)
        for rate in tune_lrs:
            extra = {name: ["--lr", f"{rate:g}", *blind] for name in names}
            folders = {name: lr_folder(rate, name) for name in names}
            run_jobs(suite_plan(out, nodes, tune_seeds, passed, real, extra, folders),
                     f"tuning, lr {rate:g}")
        choices = choose(out, names, tune_lrs, tune_seeds)
        write_json_atomic(os.path.join(out, CHOICES), choices)
        write_text_atomic(os.path.join(out, "choices.md"), choices_table(choices) + "\n")
        print(choices_table(choices))
        extra = {name: ["--lr", f"{choices['lr'][name]:g}", *blind] for name in names}
        kept = suite_plan(out, nodes, seeds, passed, real, extra, choices["runs"])
        run_jobs([j for j in kept if j.seed not in tune_seeds], "the other seeds")
        read_test_set_once(kept, passed)
    else:
        extra = {name: ["--lr", f"{lr_from(lr_path, name):g}"] for name in names} if lr_path else {}
        run_jobs(suite_plan(out, nodes, seeds, passed, real, extra))
    print(compare_runs(out))
    return 0
