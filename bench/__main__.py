"""Benchmarks: speed and memory, measured rather than asserted in unit tests.

    python -m bench preprocess    # real-data preprocessing: time, cache size, peak memory
    python -m bench exchange      # what leaves a site per round, per mode and preset
    python -m bench clients       # peak memory of simulating N clients in one process
    python -m bench speed         # against MONAI: sampler, Dice, sliding window, training step
    python -m bench boundary      # predictions back on the scan's grid: nearest vs trilinear

Results are printed and kept, the latest of each, in bench/bench.json (docs/speed.md reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench.boundary import REAL_LABELS, SPACINGS, bench_boundary, boundary_table
from bench.resources import (
    REAL_CT,
    bench_clients,
    bench_exchange,
    bench_preprocess,
    clients_child,
    clients_table,
    exchange_table,
    preprocess_child,
    report,
)
from bench.speed import SPEED_PARTS, bench_speed, speed_table, with_sampling_share
from common import check_writable, write_json_atomic

BENCH_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # _clients and _child: the fresh processes that measure a peak of their own
    sub = p.add_subparsers(
        dest="what", required=True, metavar="{preprocess,exchange,clients,speed,boundary}"
    )
    q = sub.add_parser(
        "preprocess", help="real-data preprocessing: time per volume, cache size, peak memory"
    )
    q.add_argument(
        "--ct", default=REAL_CT, help=f"a CT (NIfTI) to time (default: {REAL_CT})"
    )
    q.add_argument(
        "--shape", type=int, nargs=3, default=(512, 512, 600), help="size of the synthetic CT"
    )
    q.add_argument(
        "--repeats", type=int, default=3, help="timed repeats of the real CT (median reported)"
    )
    q.add_argument("--threads", type=int, default=2, help="torch threads")
    q.add_argument(
        "--out", default=BENCH_JSON, help="where to write the results (default bench/bench.json)"
    )
    e = sub.add_parser(
        "exchange", help="keys and bytes that leave each site per round, per mode and preset"
    )
    e.add_argument("--out", default=BENCH_JSON)
    m = sub.add_parser("clients", help="peak memory of N simulated clients (phantom preset, CPU)")
    m.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    m.add_argument("--rounds", type=int, default=2)
    m.add_argument("--local-steps", type=int, default=2)
    m.add_argument("--out", default=BENCH_JSON)
    sp = sub.add_parser(
        "speed", help="sampler, Dice, sliding window, training step and FL round against MONAI"
    )
    sp.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    sp.add_argument("--quick", action="store_true", help="small sizes (CI)")
    sp.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per measurement (median reported)"
    )
    sp.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    sp.add_argument("--out", default=BENCH_JSON)
    sp.add_argument(
        "--only",
        nargs="+",
        choices=SPEED_PARTS,
        metavar="PART",
        help=f"measure only these ({', '.join(SPEED_PARTS)}); the others keep their earlier "
        "entry in --out",
    )
    b = sub.add_parser(
        "boundary", help="boundaries of a label map brought back to the scan's grid: the label "
        "map by nearest neighbour against the probabilities by trilinear interpolation"
    )
    b.add_argument("--ct", default=REAL_CT, help=f"a CT (NIfTI; default: {REAL_CT})")
    b.add_argument("--labels", default=REAL_LABELS,
                   help="its TotalSegmentator labels (default: the real CT's)")
    b.add_argument("--spacings", type=float, nargs="+", default=list(SPACINGS),
                   help="working spacings in mm, isotropic (default 3 4.5 6)")
    b.add_argument("--out", default=BENCH_JSON)
    k = sub.add_parser("_clients")
    k.add_argument("n", type=int)
    k.add_argument("rounds", type=int)
    k.add_argument("steps", type=int)
    c = sub.add_parser("_child")
    c.add_argument("image")
    c.add_argument("label")
    c.add_argument("cache")
    args = p.parse_args(argv)
    if getattr(args, "out", None):
        check_writable(args.out, "--out", file=True)
    if args.what == "_child":
        preprocess_child(args.image, args.label, args.cache)
        return 0
    if args.what == "_clients":
        clients_child(args.n, args.rounds, args.steps)
        return 0
    if args.what == "preprocess":
        result = bench_preprocess(args)
        print(report(result))
    elif args.what == "speed":
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                p.error("--device cuda: no CUDA device is visible to PyTorch")
        key = f"speed_{args.device}{'_quick' if args.quick else ''}"
        result = bench_speed(args)
        if args.only:  # a partial run updates the parts it measured; each part names its machine
            result = {**read_json(args.out).get(key, {}), **result}
        result = with_sampling_share(result)
        print(speed_table(result))
        merge_json(args.out, key, result)
        return 0
    elif args.what == "boundary":
        result = bench_boundary(args)
        print(boundary_table(result))
    elif args.what == "exchange":
        result = bench_exchange(args)
        print(exchange_table(result))
    else:
        result = bench_clients(args)
        print(clients_table(result))
    merge_json(args.out, args.what, result)
    return 0


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return {}


def merge_json(path: str, key: str, value: dict) -> None:
    """Keep every benchmark's latest result in one bench.json."""
    data = read_json(path)
    data[key] = value
    write_json_atomic(path, data)


if __name__ == "__main__":
    sys.exit(main())
