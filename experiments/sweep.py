"""`python -m experiments sweep`: when does sharing the representation pay? The setups that need
no organ they did not label (single-site models merged, SegViz, SegViz with FedBN, FedAvg with
the marginal loss, ConDistFL) trained with at most N training cases a site (--train-cases N),
for several N and seeds, each at the learning rate a tuned suite chose for it; then a table and
a figure of Dice (mean over organs, and per organ) against the cases per site, each point the
mean over seeds with a 95 % interval from a hierarchical bootstrap (seeds, then cases).

`--all-from DIR` adds the point with every case, from a tuned suite's runs at four sites (the
main table). Finished runs are skipped and unfinished ones resumed: issue the command again to
go on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from common import write_json_atomic, write_text_atomic
from experiments import stats
from experiments.compare import MEAN, by_case, read_runs, scored_rows
from experiments.suite import lr_from, run_jobs, suite_plan
from phantom import PhantomSpec

METHODS = {"single": "single (merged)", "segviz": "segviz (merged)",
           "segviz-fedbn": "segviz-fedbn (merged)", "fedavg-marginal": "fedavg-marginal",
           "condistfl": "condistfl"}  # the setups and their rows scored as one label map
NODES = 4
ALL = "all"


def run_sweep(out: str, cases: Sequence[int], seeds: Sequence[int], passed: list[str],
              lr_path: str, all_from: str | None = None) -> int:
    """Every run of the sweep that has not finished, then its table and figure."""
    names = [f"{stem}-{NODES}" for stem in METHODS]
    extra = {name: ["--lr", f"{lr_from(lr_path, name):g}"] for name in names}
    for n in cases:
        jobs = [j for j in suite_plan(os.path.join(out, f"cases-{n}"), [NODES], seeds,
                                      [*passed, "--train-cases", str(n)], False, extra)
                if j.stem in METHODS]
        run_jobs(jobs, f"sweep, {n} case(s) a site")
    points = {str(n): read_points(os.path.join(out, f"cases-{n}")) for n in cases}
    if all_from:
        points[ALL] = read_points(all_from)
    write_json_atomic(os.path.join(out, "sweep.json"), points)
    text = sweep_table(points)
    write_text_atomic(os.path.join(out, "sweep.md"), text + "\n")
    print(text)
    figure(points, os.path.join(out, "figures", "sweep.png"))
    return 0


def read_points(folder: str) -> dict[str, dict[str, dict]]:
    """{method: {organ or MEAN: {"mean", "low", "high", "seeds"}}} of the runs under `folder`."""
    rows = scored_rows(
        {
            n: ms
            for n, ms in read_runs(folder).items()
            if n.rsplit("-", 1)[0] in METHODS and ms[0]["nodes"] == NODES and ms[0]["dice"]
        }
    )
    out = {}
    for stem, row in METHODS.items():
        seeds = rows.get(row.replace(stem, f"{stem}-{NODES}", 1))
        if not seeds:
            continue
        organs = seeds[0]["organs"]
        out[stem] = {col: point(per) for col, per in by_case(seeds, "dice", organs).items()}
    return out


def point(per_seed: dict[int, dict[str, float]]) -> dict:
    """The mean over seeds of each seed's mean, and its 95 % interval (seeds, then cases)."""
    values = [np.asarray([v for v in cases.values() if v is not None], float)
              for cases in per_seed.values()]
    mean = float(np.mean([v.mean() for v in values]))
    boot = stats.hierarchical_bootstrap(values)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"mean": mean, "low": float(low), "high": float(high), "seeds": len(values)}


def sweep_table(points: dict[str, dict]) -> str:
    """Rows: methods; columns: cases per site; cells: Dice mean over organs [95 % interval]."""
    sizes = list(points)
    lines = ["| setup | " + " | ".join(f"{s} case(s) a site" if s != ALL else "every case"
                                       for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for stem, row in METHODS.items():
        cells = []
        for size in sizes:
            p = points[size].get(stem, {}).get(MEAN)
            cells.append("—" if p is None else f"{p['mean']:.3f} [{p['low']:.3f}, {p['high']:.3f}]")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(points: dict[str, dict], path: str) -> None:
    """Dice against cases per site: the mean over organs, then each organ; one line per method,
    its 95 % interval shaded."""
    from experiments.figures import pyplot

    plt = pyplot()
    sizes = list(points)
    full = max(v for k, v in PhantomSpec().cases.items() if k != "test")
    x = [full if s == ALL else int(s) for s in sizes]
    columns = [MEAN, "liver", "spleen", "pancreas", "kidneys"]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.3 * len(columns), 3.6), sharey=True)
    for ax, col in zip(axes, columns):
        for stem, row in METHODS.items():
            got = [(xi, points[s][stem][col]) for xi, s in zip(x, sizes)
                   if col in points[s].get(stem, {})]
            if not got:
                continue
            xs = [g[0] for g in got]
            line = ax.plot(xs, [g[1]["mean"] for g in got], marker="o", ms=3, label=row)[0]
            ax.fill_between(xs, [g[1]["low"] for g in got], [g[1]["high"] for g in got],
                            color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [s if s != ALL else f"all\n(6-{full})" for s in sizes])
        ax.set_title("mean over organs" if col == MEAN else col)
        ax.set_xlabel("training cases per site")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (test set)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

