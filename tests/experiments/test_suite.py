"""The suite: every setup for every node count and seed, the user's flags passed through, each
setup's own kept; finished runs skipped, unfinished ones resumed, then compared."""

import argparse
import json

import pytest

from helpers import SMALL, run


def parse_train(argv):
    from experiments.variants import add_variant_arguments
    from settings import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    add_variant_arguments(p)
    return config_from_args(p.parse_args(argv), p)


def test_the_suite_passes_other_flags_through_and_each_setup_keeps_its_own(tmp_path):
    from experiments.suite import script_of, suite_plan

    plan = suite_plan(
        str(tmp_path), [2, 3], [0, 1], ["--loss", "dice", "--rounds", "1"], real=False
    )
    assert len(plan) == 2 * 8 * 2  # node counts x setups x seeds
    _, folder, argv = next(
        p for p in plan if p[0] == "fedavg-marginal-2" and p[1].endswith("seed-1")
    )
    assert folder == str(tmp_path / "fedavg-marginal-2" / "seed-1")
    # a variant: python -m experiments train
    assert script_of(argv)[-1] == "train" and "--marginal" in argv
    marginal = parse_train(argv)
    assert marginal.loss == "dice" and marginal.rounds == 1 and marginal.out == folder
    plain = next(p[2] for p in plan if p[0] == "central-3")
    assert script_of(plain)[-1].endswith("train.py") and parse_train(plain).nodes == 3
    # real data has no oracle; one seed writes DIR/<setup> directly
    real = suite_plan(str(tmp_path), [4], [0], [], real=True)
    assert [p[0] for p in real] == [
        "single-4",
        "central-4",
        "central-marginal-4",
        "fedavg-4",
        "fedavg-marginal-4",
        "segviz-4",
        "segviz-fedbn-4",
    ]
    assert real[0][1] == str(tmp_path / "single-4")


@pytest.mark.slow
def test_the_suite_runs_every_setup_skips_finished_ones_and_compares(tmp_path, cache):
    out = tmp_path / "paper"
    args = (
        "-m",
        "experiments",
        "suite",
        "--nodes",
        "2",
        "--seeds",
        "0",
        "--out",
        str(out),
        "--rounds",
        "2",
        "--local-steps",
        "1",
        "--max-cases",
        "1",
        "--val-every",
        "1",
        "--cache",
        str(cache),
        *SMALL,
    )
    first = run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    names = {
        "single-2",
        "central-2",
        "central-marginal-2",
        "fedavg-2",
        "fedavg-marginal-2",
        "segviz-2",
        "segviz-fedbn-2",
        "oracle-2",
    }
    assert {p.name for p in out.iterdir() if p.is_dir()} == names
    assert all((out / n / "metrics.json").exists() for n in names)
    results = json.loads((out / "results.json").read_text())
    # binary models are also read the other way: "segviz-2 (heads)", "single-2 (merged)"
    assert {row.split(" ")[0] for row in results} == names
    assert {"segviz-2 (heads)", "segviz-fedbn-2 (heads)", "single-2 (merged)"} <= set(results)
    assert "hd95" in results["segviz-2"]["liver"] and "nsd" in results["central-2"]["spleen"]
    assert "mark" in results["fedavg-2"]["liver"] and "mark" not in results["segviz-2"]["liver"]
    md = (out / "results.md").read_text()
    assert "| oracle-2 |" in md and "Wilcoxon" in md and "HD95 in mm" in md and "NSD at 2 mm" in md
    # an unfinished run is resumed and finished ones skipped when the command is issued again
    (out / "central-2" / "metrics.json").unlink()
    (out / "central-2" / "model.pt").unlink()
    again = run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        again.stdout.count("finished, skipped") == 7
        and "central-2 seed 0: resuming" in again.stdout
    )
    assert (out / "central-2" / "metrics.json").exists()
    compare = run("-m", "experiments", "compare", str(out), "--figures")
    assert compare.returncode == 0 and "segviz-fedbn-2" in compare.stdout, compare.stderr[-2000:]
    figures = sorted(p.name for p in (out / "figures").iterdir())
    curves = [f"validation_{n}.png" for n in sorted(names)]
    assert figures == sorted(["dice_boxplot.png", "overlay_test_000.png", *curves])
    segviz_val = json.loads((out / "segviz-2" / "metrics.json").read_text())["validation"]
    assert [r["round"] for r in segviz_val] == [1, 2] and set(segviz_val[0]) == {
        "round",
        "liver",
        "spleen",
    }
    assert all(0 <= r[s] <= 1 for r in segviz_val for s in ("liver", "spleen"))
    assert all((out / "figures" / f).stat().st_size > 10_000 for f in figures)
