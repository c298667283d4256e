"""python -m experiments COMMAND: variants, the suite, comparisons, choices on validation.

    python -m experiments train [train.py flags] [--marginal | --condist | --oracle | ...]
    python -m experiments suite --out DIR [--nodes 4] [--seeds 0 1 2] [--tune-lr R R R]
                                [--lr-from DIR/choices.json] [train.py flags]
    python -m experiments sweep --out DIR --cases 1 2 4 --lr-from DIR/choices.json
    python -m experiments compare DIR [--figures]   # DIR/results.md and .json
    python -m experiments table DIR                 # one row per finished run (and seed)
    python -m experiments validation DIR [DIR ...]  # each candidate's validation Dice
    python -m experiments eval-options DIR [DIR ...] [--cases N]   # blending, clean-up

`train` is train.py with a variant that is not SegViz itself, passed into `train.train` as
functions: the marginal loss (central, fedavg), ConDistFL (fedavg), the oracle (central with
every organ labelled, phantom only), weighted or robust aggregation, screening updates, absent
clients and DP. `suite` trains every setup for every node count and seed, each as its own
process writing DIR/<setup>-<nodes>/seed-S, skipping finished runs and resuming unfinished ones,
then compares them; with `--tune-lr` it first gives every setup the same search of the learning
rate on its validation cases (suite.py). `sweep` trains the setups that need no labels they do
not have with fewer training cases a site. `compare` reads every finished run under DIR. A
candidate for `validation` is a folder of runs trained with `train.py --no-test --seeds ...` (one
folder per seed under it). `eval-options` rebuilds each run's per-site models from its
checkpoint and scores the validation cases again under each test-time option.
docs/choices.md records what was chosen.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import check_writable, resolve_device
from experiments.compare import compare_runs, table_of_runs
from experiments.selection import eval_options_table, validation_table
from experiments.suite import run_suite


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from experiments.variants import main as train_main

        return train_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("train", help="one run of train.py with a variant: --marginal, --condist, "
                                 "--oracle, --weighted, robust aggregation, absent clients, DP "
                                 "(see python -m experiments train -h)")
    s = sub.add_parser("suite", allow_abbrev=False,
                       help="every setup for every node count and seed, then compare; other flags "
                            "go to every run")
    s.add_argument("--out", default=os.path.join("runs", "paper"),
                   help="folder of the runs (default runs/paper)")
    s.add_argument("--nodes", type=int, nargs="+", default=[2, 3, 4], choices=(1, 2, 3, 4),
                   help="node counts (default 2 3 4)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    s.add_argument("--tune-lr", type=float, nargs="+", default=[], metavar="LR",
                   help="the same search for every setup: these learning rates, chosen on the "
                        "sites' validation cases; the test set is read once, for the rate kept")
    s.add_argument("--tune-seeds", type=int, nargs="+", metavar="S",
                   help="the seeds the search trains every rate with (default: --seeds); the "
                        "other seeds train at the rate kept")
    s.add_argument("--lr-from", metavar="CHOICES",
                   help="a tuned suite's choices.json: each setup at the rate chosen for it")
    w = sub.add_parser("sweep", allow_abbrev=False,
                       help="the setups that need no labels they do not have, with fewer training "
                            "cases a site; a table and a figure")
    w.add_argument("--out", default=os.path.join("runs", "sweep"), help="folder of the runs")
    w.add_argument("--cases", type=int, nargs="+", default=[1, 2, 4], metavar="N",
                   help="training cases a site (default 1 2 4)")
    w.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    w.add_argument("--lr-from", metavar="CHOICES", required=True,
                   help="a tuned suite's choices.json: each setup at the rate chosen for it")
    w.add_argument(
        "--all-from",
        metavar="DIR",
        help="a tuned suite's folder at four sites: its runs are the point with every case",
    )
    c = sub.add_parser("compare", help="DIR/results.md and results.json: every setup over seeds, "
                                       "each against SegViz scored alike, then HD95 and NSD")
    c.add_argument("folder", metavar="DIR")
    c.add_argument("--figures", action="store_true",
                   help="also DIR/figures/: Dice, HD95 and NSD as box plots, overlays of the "
                        "setups with the most nodes, loss and validation curves (needs "
                        "matplotlib; re-runs those models on the test set)")
    c.add_argument("--device", default="auto", help="for --figures: auto, cpu, cuda[:N] or mps")
    t = sub.add_parser("table", help="one row per finished run (and seed) under DIR, with its "
                                     "wall time")
    t.add_argument("folder", metavar="DIR")
    v = sub.add_parser("validation", help="each candidate's validation Dice, mean ± std over seeds")
    v.add_argument("folders", nargs="+")
    e = sub.add_parser("eval-options", help="blending and clean-up scored on the validation cases")
    e.add_argument("folders", nargs="+")
    e.add_argument("--cases", type=int, metavar="N",
                   help="phantom runs: score on N validation cases a site (training's 4 and more)")
    args, passed = p.parse_known_args(argv)
    if passed and args.what not in ("suite", "sweep"):
        p.error(f"unrecognized arguments: {' '.join(passed)}")
    if getattr(args, "cases", None) is not None and min(args.cases if isinstance(args.cases, list)
                                                          else [args.cases]) < 1:
        p.error(f"{args.what}: --cases: at least 1 case a site")
    if args.what in ("suite", "sweep"):
        check_suite_flags(p, args, passed)
        check_writable(args.out, "--out")
        if args.what == "sweep":
            from experiments.sweep import run_sweep

            return run_sweep(args.out, sorted(set(args.cases)), args.seeds, passed, args.lr_from,
                             args.all_from)
        return run_suite(args.out, sorted(set(args.nodes)), args.seeds, passed, args.tune_lr,
                         args.tune_seeds, args.lr_from)
    if args.what == "table":
        print(table_of_runs(args.folder))
    elif args.what == "compare":
        check_writable(args.folder, "DIR")
        print(compare_runs(args.folder))
        if args.figures:
            from experiments.figures import figures

            print(figures(args.folder, resolve_device(args.device, p)))
    elif args.what == "validation":
        print(validation_table(args.folders))
    else:
        print(eval_options_table(args.folders, args.cases))
    return 0


def check_suite_flags(
    p: argparse.ArgumentParser, args: argparse.Namespace, passed: list[str]
) -> None:
    """What a suite decides itself may not be passed to its runs; its own flags must fit."""
    from experiments.variants import VARIANT_KEYS

    given = {a.split("=")[0] for a in passed}
    own = {"--mode", "--fedbn", "--resume", "--overwrite", "--seeds", "--out", "--nodes"}
    if args.what == "sweep":
        own |= {"--train-cases", "--lr"}
    if getattr(args, "tune_lr", None) or getattr(args, "lr_from", None):
        own |= {"--lr", "--no-test", "--val-every"}
    if clash := sorted(given & own):
        p.error(f"{args.what}: {', '.join(clash)}: the {args.what}'s own (it resumes by itself)")
    if variants := sorted(given & {"--" + k.replace("_", "-") for k in VARIANT_KEYS}):
        p.error(f"{args.what}: {', '.join(variants)}: the suite runs the paper's setups; a "
                "variant is python -m experiments train")
    if getattr(args, "tune_lr", None) and args.lr_from:
        p.error("suite: --tune-lr or --lr-from, not both")
    if getattr(args, "tune_lr", None) and len(args.tune_lr) < 2:
        p.error("suite: --tune-lr needs at least two learning rates to choose from")


if __name__ == "__main__":
    sys.exit(main())
