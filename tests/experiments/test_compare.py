"""Comparing finished runs: tables over seeds, each row against SegViz scored alike with an
interval that respects the seed, pairs matched by (seed, case name) or refused; HD95 and NSD
tables; a run scored after training; the table of runs."""

import json
import os

import pytest

from experiments.compare import compare_runs
from helpers import run, tiny
from report import summarise

CASES = ["test_000", "test_001"]


def write_run(folder, mode, nodes, seed, scorings, surface=None, names=CASES, stem=None):
    """A metrics.json as train.py writes it: {scoring: {organ: [Dice per case]}}, and the surface
    metrics of those scorings that `surface` ({scoring: {"hd95": ..., "nsd": ...}}) gives."""
    name = f"{stem or mode}-{nodes}"
    d = os.path.join(folder, name, f"seed-{seed}")
    os.makedirs(d)
    first = next(iter(scorings))
    surface = surface or {}
    by_scoring = {k: {"dice": summarise(v), **{metric: summarise(values) for metric, values
                                                in surface.get(k, {}).items()}}
                  for k, v in scorings.items()}
    m = {"name": name, "mode": mode, "nodes": nodes, "seed": seed, "organs": list(scorings[first]),
         "dice": by_scoring[first]["dice"], "scoring": first, "by_scoring": by_scoring,
         "case_names": list(names)}
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump(m, f)
    return d


def segviz(folder, seed, merged, heads, **kw):
    return write_run(
        folder, "segviz", 2, seed, {"merged": {"liver": merged}, "heads": {"liver": heads}}, **kw
    )


def md_row(table, name):
    """The cells of the markdown row named exactly `name` (the first table that has it)."""
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_rows_are_named_by_their_scoring_and_compared_with_segviz_scored_alike(tmp_path):
    seg = {0: [0.8, 0.9], 1: [0.6, 0.7], 2: [0.7, 0.8]}  # per-seed means 0.85, 0.65, 0.75
    for seed, cases in seg.items():
        segviz(tmp_path, seed, cases, [c - 0.1 for c in cases])
        write_run(tmp_path, "central", 2, seed, {"classes": {"liver": [c - 0.3 for c in cases]}})
        write_run(tmp_path, "single", 2, seed, {"heads": {"liver": [c - 0.05 for c in cases]},
                                               "merged": {"liver": cases}})
    (tmp_path / "segviz-2" / "seed-0" / "eval").mkdir()  # an eval.py re-run is not a training run
    (tmp_path / "segviz-2" / "seed-0" / "eval" / "metrics.json").write_text('{"checkpoint": "x"}')
    text = compare_runs(str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result) == {"segviz-2 (merged)", "segviz-2 (heads)", "central-2", "single-2 (heads)",
                           "single-2 (merged)"}
    liver = result["segviz-2 (merged)"]["liver"]
    assert liver["mean"] == pytest.approx(0.75) and liver["std"] == pytest.approx(0.1)
    assert "vs_segviz" not in liver  # the reference itself
    # the central model against the merged meta-model: 0.3 lower everywhere
    central = result["central-2"]["liver"]["vs_segviz"]
    assert (
        central["difference"] == pytest.approx(-0.3)
        and central["high"] < 0
        and central["seeds"] == 3
    )
    # each head alone against SegViz's heads alone: single-site heads are 0.05 above them
    heads = result["single-2 (heads)"]["liver"]["vs_segviz"]
    assert heads["difference"] == pytest.approx(0.05)
    # merged single-site models against the merged meta-model: level
    assert result["single-2 (merged)"]["liver"]["vs_segviz"]["difference"] == pytest.approx(0.0)
    assert "0.750 ± 0.100" in text and "3 seed(s)" in text
    assert md_row(text[text.index("difference to SegViz"):], "central-2")[1].startswith("-0.300 [")


def test_the_comparison_refuses_rows_whose_seed_and_case_pairs_do_not_match(tmp_path, capsys):
    for seed in (0, 1):
        segviz(tmp_path, seed, [0.8, 0.9], [0.7, 0.8])
        names = ["test_000", "test_007"] if seed == 1 else CASES  # another test set in seed 1
        write_run(tmp_path, "central", 2, seed, {"classes": {"liver": [0.5, 0.6]}}, names=names)
    with pytest.raises(SystemExit) as e:
        compare_runs(str(tmp_path))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "central-2 and segviz-2 (merged)" in err and "seed 1" in err


def test_the_mean_over_organs_is_tested_like_each_organ(tmp_path):
    for seed in range(3):
        write_run(
            tmp_path,
            "segviz",
            2,
            seed,
            {
                "merged": {"liver": [0.9, 0.9], "spleen": [0.7, 0.7]},
                "heads": {"liver": [0.9, 0.9], "spleen": [0.7, 0.7]},
            },
        )
        write_run(
            tmp_path, "fedavg", 2, seed, {"classes": {"liver": [0.8, 0.8], "spleen": [0.6, 0.7]}}
        )
    compare_runs(str(tmp_path))
    fedavg = json.loads((tmp_path / "results.json").read_text())["fedavg-2"]
    assert fedavg["mean"]["mean"] == pytest.approx(0.725)  # (0.8 + 0.65) / 2
    assert fedavg["mean"]["vs_segviz"]["difference"] == pytest.approx(-0.075)


def test_a_run_trained_without_test_counts_with_its_later_evaluation(tmp_path):
    import shutil

    for seed, cases in {0: [0.8, 0.9], 1: [0.6, 0.7]}.items():
        d = segviz(tmp_path, seed, cases, cases)
        with open(os.path.join(d, "metrics.json")) as f:
            scored = json.load(f)
        os.makedirs(os.path.join(d, "eval"))
        with open(os.path.join(d, "eval", "metrics.json"), "w") as f:
            json.dump({**scored, "checkpoint": os.path.join(d, "model.pt")}, f)
        with open(os.path.join(d, "metrics.json"), "w") as f:  # as --no-test writes it
            json.dump({**scored, "dice": {}, "by_scoring": {}, "case_names": []}, f)
    compare_runs(str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["segviz-2 (merged)"]["liver"]["mean"] == pytest.approx(0.75)
    # a run not yet evaluated is left out, not counted as zero
    shutil.rmtree(tmp_path / "segviz-2" / "seed-1" / "eval")
    compare_runs(str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["segviz-2 (merged)"]["liver"]["mean"] == pytest.approx(0.85)


def test_hd95_and_nsd_tables_take_means_over_finite_values_and_count_the_rest(tmp_path):
    nan = float("nan")
    hd95 = {0: [10.0, nan], 1: [12.0, 14.0], 2: [nan, nan]}  # seed means 10 and 13; seed 2 has none
    nsd = {0: [0.5, 0.7], 1: [0.6, 0.8], 2: [0.9, 0.9]}  # seed means 0.6, 0.7, 0.9
    for seed in range(3):
        surface = {"merged": {"hd95": {"liver": hd95[seed]}, "nsd": {"liver": nsd[seed]}},
                   "heads": {"hd95": {"liver": [5.0, 5.0]}, "nsd": {"liver": [1.0, 1.0]}}}
        segviz(tmp_path, seed, [0.8, 0.9], [0.7, 0.8], surface=surface)
    text = compare_runs(str(tmp_path))
    hd_at, nsd_at = text.index("HD95 in mm"), text.index("NSD at 2 mm")
    # 11.5 = mean of the seeds' 10 and 13; std over those two seeds; three (seed, case) pairs had
    # no value
    assert md_row(text[hd_at:nsd_at], "segviz-2 (merged)") == [
        "segviz-2 (merged)",
        "11.5 ± 2.1 (3 nan)",
    ]
    assert md_row(text[hd_at:nsd_at], "segviz-2 (heads)") == ["segviz-2 (heads)", "5.0 ± 0.0"]
    assert md_row(text[nsd_at:], "segviz-2 (merged)") == ["segviz-2 (merged)", "0.733 ± 0.153"]
    liver = json.loads((tmp_path / "results.json").read_text())["segviz-2 (merged)"]["liver"]
    assert liver["hd95"]["mean"] == pytest.approx(11.5) and liver["hd95"]["nan"] == 3
    assert liver["nsd"]["mean"] == pytest.approx(0.7333333)


@pytest.mark.slow
def test_table_gathers_finished_runs(tmp_path, cache):
    runs = tmp_path / "runs"
    assert tiny("central", runs / "central", cache).returncode == 0
    assert tiny("segviz", runs / "segviz", cache).returncode == 0
    (runs / "unfinished").mkdir()  # a run without metrics.json is left out
    result = run("-m", "experiments", "table", str(runs))
    assert result.returncode == 0, result.stderr
    for name in ("central", "segviz"):
        dice = json.loads((runs / name / "seed-0" / "metrics.json").read_text())["dice"]["liver"]
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {name}-2 "))
        assert f"{dice['mean']:.3f} ± {dice['std']:.3f}" in row
    assert run("-m", "experiments", "table", str(tmp_path / "none")).returncode == 2
