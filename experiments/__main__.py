"""python -m experiments COMMAND: variants, the suite, comparisons, choices on validation.

    python -m experiments train [train.py flags] [--marginal | --oracle | robustness flags] python
    -m experiments suite --out DIR [--nodes 2 3 4] [--seeds 0 1 2] [train.py flags] python -m
    experiments compare DIR [--figures] # DIR/results.md and .json: every setup over seeds python -m
    experiments table DIR # one row per finished run (and seed) python -m experiments validation DIR
    [DIR ...] # each candidate's validation Dice over seeds python -m experiments eval-options DIR
    [DIR ...] [--cases N] # blending and clean-up, on validation

`train` is train.py with a variant that is not SegViz itself, passed into `train.train` as
functions: the marginal loss (central, fedavg), the oracle (central with every organ labelled,
phantom only), weighted or robust aggregation, screening updates, absent clients and DP.
`suite` trains every setup for every node count and seed, each as its own process writing
DIR/<setup>-<nodes>/seed-S, skipping finished runs and resuming unfinished ones, then compares
them. `compare` reads every finished run under DIR. A candidate for `validation` is a folder of
runs trained with `train.py --no-test --seeds ...` (one folder per seed under it).
`eval-options` rebuilds each run's per-site models from its checkpoint and scores the
validation cases again under each test-time option. docs/choices.md records what was chosen.
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
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser(
        "train",
        help="one run of train.py with a variant: --marginal, --oracle, --weighted, robust "
        "aggregation, absent clients, DP (see python -m experiments train -h)",
    )
    s = sub.add_parser(
        "suite",
        help="every setup for every node count and seed (train.py runs), then compare; "
        "other flags go to train.py",
    )
    s.add_argument(
        "--out",
        default=os.path.join("runs", "paper"),
        help="folder of the runs (default runs/paper)",
    )
    s.add_argument("--nodes", type=int, nargs="+", default=[2, 3, 4], choices=(1, 2, 3, 4),
                   help="node counts (default 2 3 4)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    c = sub.add_parser(
        "compare",
        help="DIR/results.md and results.json: every setup over seeds, with Wilcoxon "
        "tests against SegViz, then its HD95 and NSD",
    )
    c.add_argument("folder", metavar="DIR")
    c.add_argument(
        "--figures",
        action="store_true",
        help="also DIR/figures/dice_boxplot.png (a row per number of nodes), one overlay per test "
             "case of the setups with the most nodes, and validation curves of runs trained with "
             "--val-every (needs matplotlib; re-runs those models on the test set)",
    )
    c.add_argument("--device", default="auto", help="for --figures: auto, cpu, cuda[:N] or mps")
    t = sub.add_parser(
        "table", help="one row per finished run (and seed) under DIR, with its wall time"
    )
    t.add_argument("folder", metavar="DIR")
    v = sub.add_parser("validation", help="each candidate's validation Dice, mean ± std over seeds")
    v.add_argument("folders", nargs="+")
    e = sub.add_parser("eval-options", help="blending and clean-up scored on the validation cases")
    e.add_argument("folders", nargs="+")
    e.add_argument("--cases", type=int, metavar="N",
                   help="phantom runs: score on N validation cases a site (training's 4 and more)")
    args, passed = p.parse_known_args(argv)
    if passed and args.what != "suite":
        p.error(f"unrecognized arguments: {' '.join(passed)}")
    if getattr(args, "cases", None) is not None and args.cases < 1:
        p.error(f"eval-options: --cases {args.cases}: needs at least 1 case a site")
    if args.what == "suite":
        given = {a.split("=")[0] for a in passed}
        if {"--mode", "--fedbn", "--resume"} & given:
            p.error(
                "suite: --mode, --fedbn and --resume are the suite's own (it resumes by itself)"
            )
        from experiments.variants import VARIANT_KEYS

        if variants := sorted(given & {"--" + k.replace("_", "-") for k in VARIANT_KEYS}):
            p.error(
                f"suite: {', '.join(variants)}: the suite runs the paper's setups; a variant is "
                f"python -m experiments train"
            )
        check_writable(args.out, "--out")
        return run_suite(args.out, sorted(set(args.nodes)), args.seeds, passed)
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


if __name__ == "__main__":
    sys.exit(main())
