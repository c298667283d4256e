"""The suite: every setup for every node count and seed, the user's flags passed through, each
setup's own kept; the same learning-rate search for every setup, chosen on validation, the test
set read once for the rate kept; finished runs skipped, unfinished ones resumed; the sweep over
cases per site."""

import argparse
import json
import os

import pytest

from experiments import suite
from helpers import SMALL, run

NAMES = {"single-2", "central-2", "central-marginal-2", "fedavg-2", "fedavg-marginal-2",
         "condistfl-2", "segviz-2", "segviz-fedbn-2", "oracle-2"}


def parse_train(argv):
    from experiments.variants import add_variant_arguments
    from settings import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    add_variant_arguments(p)
    return config_from_args(p.parse_args(argv), p)


def test_the_suite_passes_other_flags_through_and_each_setup_keeps_its_own(tmp_path):
    plan = suite.suite_plan(str(tmp_path), [2, 3], [0, 1], ["--loss", "dice", "--rounds", "1"],
                            real=False)
    assert len(plan) == 2 * 9 * 2  # node counts x setups x seeds
    job = next(j for j in plan if j.name == "fedavg-marginal-2" and j.seed == 1)
    assert job.folder == str(tmp_path / "fedavg-marginal-2" / "seed-1")
    # a variant: python -m experiments train
    assert suite.script_of(job.argv)[-1] == "train" and "--marginal" in job.argv
    marginal = parse_train(job.argv)
    assert marginal.loss == "dice" and marginal.rounds == 1
    assert os.path.join(marginal.out, "seed-1") == job.folder  # train.py's OUT/seed-S
    plain = next(j for j in plan if j.name == "central-3")
    assert (
        suite.script_of(plain.argv)[-1].endswith("train.py") and parse_train(plain.argv).nodes == 3
    )
    # real data has no oracle; a setup's extra flags come after the user's
    real = suite.suite_plan(str(tmp_path), [4], [0], ["--lr", "1"], real=True,
                            extra={"segviz-4": ["--lr", "0.5"]})
    assert [j.name for j in real] == ["single-4", "central-4", "central-marginal-4", "fedavg-4",
                                      "fedavg-marginal-4", "condistfl-4", "segviz-4",
                                      "segviz-fedbn-4"]
    assert parse_train(next(j for j in real if j.name == "segviz-4").argv).lr == 0.5


def test_every_setup_keeps_the_rate_of_its_best_mean_validation(tmp_path):
    # two setups, two rates, two seeds: the validation written as train.py writes it
    scores = {("segviz-4", 0.001): [0.70, 0.72], ("segviz-4", 0.003): [0.80, 0.60],
              ("single-4", 0.001): [0.50, 0.60], ("single-4", 0.003): [0.65, 0.60]}
    for (name, lr), values in scores.items():
        for seed, value in enumerate(values):
            folder = tmp_path / suite.lr_folder(lr, name) / f"seed-{seed}"
            folder.mkdir(parents=True)
            check = {"round": 100, "liver": value, "spleen": value}
            (folder / "metrics.json").write_text(json.dumps({"validation": [check]}))
    chosen = suite.choose(str(tmp_path), ["segviz-4", "single-4"], [0.001, 0.003], [0, 1])
    assert chosen["lr"] == {"segviz-4": 0.001, "single-4": 0.003}  # 0.71 > 0.70; 0.625 > 0.55
    assert chosen["runs"]["segviz-4"] == suite.lr_folder(0.001, "segviz-4")
    table = suite.choices_table(chosen)
    assert "**0.710 ± 0.014**" in table and "| single-4 | 0.550 ± 0.071 | **0.625" in table
    # other node counts take the choice at the most nodes
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"lr": {"segviz-3": 0.01, "segviz-4": 0.001}}))
    assert suite.lr_from(str(path), "segviz-2") == 0.001
    assert suite.lr_from(str(path), "segviz-3") == 0.01
    # one tuning seed: the value alone, no spread of zero
    one = suite.choices_table(suite.choose(str(tmp_path), ["segviz-4"], [0.001, 0.003], [0]))
    assert "| segviz-4 | 0.700 | **0.800** | 0.003 |" in one and "±" not in one


@pytest.mark.parametrize("argv, says", [
    (["suite", "--tune-lr", "0.001"], "at least two learning rates"),
    (["suite", "--tune-lr", "0.001", "0.01", "--lr-from", "x"], "not both"),
    (["suite", "--tune-lr", "0.001", "0.01", "--lr", "0.1"], "--lr: the suite's own"),
    (["suite", "--marginal"], "a variant is python -m experiments train"),
    (["sweep", "--lr-from", "x", "--train-cases", "2"], "--train-cases: the sweep's own"),
])
def test_what_a_suite_decides_itself_is_refused_in_one_line(argv, says, tmp_path, capsys):
    from experiments.__main__ import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and says in capsys.readouterr().err


TINY = ("--nodes", "2", "--rounds", "2", "--local-steps", "1", "--max-cases", "1", *SMALL)


@pytest.mark.slow
def test_the_suite_runs_every_setup_skips_finished_ones_and_compares(tmp_path, cache):
    out = tmp_path / "paper"
    args = ("-m", "experiments", "suite", "--seeds", "0", "--out", str(out), "--val-every", "1",
            "--cache", str(cache), *TINY)
    first = run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert {p.name for p in out.iterdir() if p.is_dir()} == NAMES
    assert all((out / n / "seed-0" / "metrics.json").exists() for n in NAMES)
    results = json.loads((out / "results.json").read_text())
    # binary models are read both ways: "segviz-2 (merged)", "single-2 (heads)"
    assert {row.split(" ")[0] for row in results} == NAMES
    assert {"segviz-2 (heads)", "segviz-fedbn-2 (merged)", "single-2 (merged)"} <= set(results)
    assert (
        "hd95" in results["segviz-2 (merged)"]["liver"] and "nsd" in results["central-2"]["spleen"]
    )
    assert "vs_segviz" in results["fedavg-2"]["liver"]
    md = (out / "results.md").read_text()
    assert "| oracle-2 |" in md and "difference to SegViz" in md and "HD95 in mm" in md
    # an unfinished run is resumed and finished ones skipped when the command is issued again
    (out / "central-2" / "seed-0" / "metrics.json").unlink()
    (out / "central-2" / "seed-0" / "model.pt").unlink()
    again = run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        again.stdout.count("finished, skipped") == 8
        and "central-2 seed 0: resuming" in again.stdout
    )
    assert (out / "central-2" / "seed-0" / "metrics.json").exists()


@pytest.mark.slow
def test_a_tuned_suite_chooses_on_validation_and_reads_the_test_set_once_then_sweeps(
    tmp_path, cache
):
    out = tmp_path / "tuned"
    tuned = run("-m", "experiments", "suite", "--seeds", "0", "1", "--tune-seeds", "0", "--tune-lr",
                "0.001", "0.01", "--out", str(out), "--cache", str(cache), *TINY)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    choices = json.loads((out / "choices.json").read_text())
    assert set(choices["lr"]) == NAMES and set(choices["lr"].values()) <= {0.001, 0.01}
    for name in NAMES:
        kept = out / choices["runs"][name]
        for seed in (0, 1):  # seed 1 trained at the kept rate only, without the test set
            m = json.loads((kept / f"seed-{seed}" / "metrics.json").read_text())
            assert m["dice"] == {} and m["validation"] and m["config"]["lr"] == choices["lr"][name]
            assert (kept / f"seed-{seed}" / "eval" / "metrics.json").exists()  # read once, after
        other = 0.01 if choices["lr"][name] == 0.001 else 0.001
        assert not (out / suite.lr_folder(other, name) / "seed-1").exists()
        assert not (out / suite.lr_folder(other, name) / "seed-0" / "eval").exists()
    results = json.loads((out / "results.json").read_text())
    assert (
        results["segviz-2 (merged)"]["liver"]["seeds"]
        and "vs_segviz" in results["single-2 (merged)"]["liver"]
    )
    assert "kept" in (out / "choices.md").read_text()
    # the sweep over cases per site at the kept rates, with the tuned runs as every case's point
    sweep = run("-m", "experiments", "sweep", "--cases", "1", "--seeds", "0", "--lr-from",
                str(out / "choices.json"), "--all-from", str(out), "--out", str(tmp_path / "sweep"),
                "--cache", str(cache), "--rounds", "2", "--local-steps", "1", *SMALL)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    points = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(points) == {"1", "all"} and set(points["1"]) == {"single", "segviz", "segviz-fedbn",
                                                                 "fedavg-marginal", "condistfl"}
    lone = json.loads(
        (tmp_path / "sweep" / "cases-1" / "segviz-4" / "seed-0" / "metrics.json").read_text()
    )
    assert lone["config"]["train_cases"] == 1 and len(lone["case_names"]) == 8  # the test set whole
    assert (tmp_path / "sweep" / "figures" / "sweep.png").stat().st_size > 10_000
