"""Variants of a run that are not SegViz itself: the marginal loss, names that never take a plain
run's folder, and variants that do not fit refused before anything is written."""

import os

from helpers import run


def test_a_variant_run_never_takes_a_plain_runs_folder(monkeypatch, tmp_path):
    from experiments import variants

    monkeypatch.chdir(tmp_path)  # the default out folders are checked for writability here

    made = {}
    monkeypatch.setattr(
        variants, "train_seeds", lambda cfg, seeds, *rest: made.setdefault("cfg", cfg) and 0
    )
    variants.main(["--mode", "segviz", "--dropout", "0.2", "--aggregate", "median"])
    assert made["cfg"].out == os.path.join("runs", "segviz-dropout0.2-median-4")
    names = {}
    for argv in (
        ["--mode", "fedavg", "--marginal"],
        ["--mode", "central", "--oracle"],
        ["--weighted", "--fedbn"],
        ["--dp-clip", "1", "--dp-noise", "0.01"],
        [],
    ):
        made.clear()
        variants.main(argv)
        names[made["cfg"].out] = argv
    assert sorted(names) == sorted(
        os.path.join("runs", n)
        for n in (
            "fedavg-marginal-4",
            "oracle-4",
            "segviz-weighted-fedbn-4",
            "segviz-dpclip1.0-dpnoise0.01-4",
            "segviz-4",
        )
    )


def test_variants_that_do_not_fit_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    both = run(
        "-m",
        "experiments",
        "train",
        "--mode",
        "central",
        "--oracle",
        "--marginal",
        "--out",
        str(out),
    )
    assert both.returncode == 2 and "--oracle and --marginal cannot be combined" in both.stderr
    suite = run("-m", "experiments", "suite", "--out", str(out), "--dropout", "0.2")
    assert suite.returncode == 2 and "python -m experiments train" in suite.stderr
    assert not out.exists()
