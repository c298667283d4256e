"""Comparing finished runs: tables over seeds with each setup against SegViz, HD95 and NSD tables,
a run scored after training, and the table of runs."""

import json

import pytest

from helpers import run, tiny


def write_run(
    folder, mode, nodes, seed, cases_by_organ, scoring="classes", by_scoring=None, surface=None
):
    """A metrics.json as train.py writes it: Dice of every scoring, and the surface metrics of
    those that `surface` ({scoring: {"hd95": ..., "nsd": ...}}) gives."""
    import json
    import os

    from report import summarise

    d = os.path.join(folder, f"{mode}-{nodes}", f"seed-{seed}")
    os.makedirs(d)
    m = {
        "name": f"{mode}-{nodes}",
        "mode": mode,
        "nodes": nodes,
        "seed": seed,
        "organs": list(cases_by_organ),
        "dice": summarise(cases_by_organ),
        "scoring": scoring,
    }
    by_scoring = by_scoring or {scoring: cases_by_organ}
    surface = surface or {}
    m["by_scoring"] = {
        k: {
            "dice": summarise(v),
            **{metric: summarise(values) for metric, values in surface.get(k, {}).items()},
        }
        for k, v in by_scoring.items()
    }
    m.update({metric: m["by_scoring"][scoring].get(metric, {}) for metric in ("hd95", "nsd")})
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump(m, f)


def test_compare_reports_mean_and_std_over_seeds_and_tests_matched_pairs(tmp_path):
    import json

    from experiments.compare import compare_runs

    seg = {0: [0.8, 0.9], 1: [0.6, 0.7], 2: [0.7, 0.8]}  # per-seed means 0.85, 0.65, 0.75
    for seed, cases in seg.items():
        merged = {"liver": cases}
        heads = {"liver": [c - 0.1 for c in cases]}
        write_run(tmp_path, "segviz", 2, seed, merged, "merged", {"merged": merged, "heads": heads})
        write_run(tmp_path, "central", 2, seed, {"liver": [c - 0.3 for c in cases]})
    (tmp_path / "segviz-2" / "seed-0" / "eval").mkdir()
    (tmp_path / "segviz-2" / "seed-0" / "eval" / "metrics.json").write_text('{"checkpoint": "x"}')
    text = compare_runs(str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["segviz-2"]["liver"]["mean"] == pytest.approx(0.75)
    # sample std of 0.85, 0.65, 0.75
    assert result["segviz-2"]["liver"]["std"] == pytest.approx(0.1)
    assert result["segviz-2 (heads)"]["liver"]["mean"] == pytest.approx(0.65)
    # six matched (seed, case) pairs, every one 0.3 lower: the signed-rank test's smallest p for n =
    # 6
    assert result["central-2"]["liver"]["p_vs_segviz"] == pytest.approx(0.03125)
    assert "0.750 ± 0.100" in text and "3 seed(s)" in text


def test_compare_counts_a_run_trained_without_test_with_its_later_evaluation(tmp_path):
    import json
    import shutil

    from experiments.compare import compare_runs

    for seed, cases in {0: [0.8, 0.9], 1: [0.6, 0.7]}.items():
        write_run(tmp_path, "segviz", 2, seed, {"liver": cases})
        d = tmp_path / "segviz-2" / f"seed-{seed}"
        scored = json.loads((d / "metrics.json").read_text())
        (d / "eval").mkdir()
        (d / "eval" / "metrics.json").write_text(
            json.dumps({**scored, "checkpoint": str(d / "model.pt")})
        )
        # as --no-test writes it
        (d / "metrics.json").write_text(json.dumps({**scored, "dice": {}}))
    compare_runs(str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["segviz-2"]["liver"]["mean"] == pytest.approx(0.75)
    # a run not yet evaluated is left out, not counted as zero
    shutil.rmtree(tmp_path / "segviz-2" / "seed-1" / "eval")
    compare_runs(str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["segviz-2"]["liver"][
        "mean"
    ] == pytest.approx(0.85)


def md_row(table, name):
    """The cells of the markdown row named exactly `name`."""
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_compare_adds_hd95_and_nsd_tables_with_means_over_finite_values_and_nan_counts(tmp_path):
    import json

    from experiments.compare import compare_runs

    nan = float("nan")
    hd95 = {0: [10.0, nan], 1: [12.0, 14.0], 2: [nan, nan]}  # seed means 10 and 13; seed 2 has none
    nsd = {0: [0.5, 0.7], 1: [0.6, 0.8], 2: [0.9, 0.9]}  # seed means 0.6, 0.7, 0.9
    for seed in range(3):
        surface = {"merged": {"hd95": {"liver": hd95[seed]}, "nsd": {"liver": nsd[seed]}},
                   "heads": {"hd95": {"liver": [5.0, 5.0]}, "nsd": {"liver": [1.0, 1.0]}}}
        write_run(tmp_path, "segviz", 2, seed, {"liver": [0.8, 0.9]}, "merged",
                  {"merged": {"liver": [0.8, 0.9]}, "heads": {"liver": [0.7, 0.8]}}, surface)
        # evaluated before surface metrics
        write_run(tmp_path, "central", 2, seed, {"liver": [0.5, 0.6]})
    text = compare_runs(str(tmp_path))
    dice_at, hd_at, nsd_at = (text.index(t) for t in ("| setup |", "HD95 in mm", "NSD at 2 mm"))
    assert dice_at < hd_at < nsd_at
    hd_table = text[hd_at:nsd_at]
    # 11.5 = mean of the seeds' 10 and 13; std over those two seeds; three (seed, case) pairs had no
    # value
    assert md_row(hd_table, "segviz-2") == ["segviz-2", "11.5 ± 2.1 (3 nan)"]
    assert md_row(hd_table, "segviz-2 (heads)") == ["segviz-2 (heads)", "5.0 ± 0.0"]
    assert md_row(hd_table, "central-2") == ["central-2", "—"]
    assert md_row(text[nsd_at:], "segviz-2") == ["segviz-2", "0.733 ± 0.153"]
    # Dice keeps its Wilcoxon marks
    assert md_row(text[dice_at:hd_at], "central-2")[1].endswith("*")
    result = json.loads((tmp_path / "results.json").read_text())
    liver = result["segviz-2"]["liver"]
    assert liver["mean"] == pytest.approx(0.85)  # Dice where it always was
    assert liver["hd95"]["mean"] == pytest.approx(11.5) and liver["hd95"]["nan"] == 3
    assert liver["hd95"]["seeds"] == [10.0, 13.0, None]
    assert liver["nsd"]["mean"] == pytest.approx(0.7333333) and "nan" not in liver["nsd"]
    assert "hd95" not in result["central-2"]["liver"]


def test_wilcoxon_marks_on_known_inputs():
    from experiments.compare import significance

    a = [0.9] * 8
    b = [0.9 - 0.01 * (i + 1) for i in range(8)]  # eight paired differences, all positive
    p, mark = significance(a, b)
    assert p == pytest.approx(2 / 256) and mark == "**"
    p, mark = significance(a[:6], b[:6])
    assert p == pytest.approx(2 / 64) and mark == "*"
    p, mark = significance([0.5, 0.6, 0.7, 0.8], [0.6, 0.5, 0.8, 0.7])
    assert mark == "ns" and p > 0.5
    assert significance(a, a) == (1.0, "ns")


@pytest.mark.slow
def test_table_gathers_finished_runs(tmp_path, cache):
    runs = tmp_path / "runs"
    assert tiny("central", runs / "central", cache).returncode == 0
    assert tiny("segviz", runs / "segviz", cache).returncode == 0
    (runs / "unfinished").mkdir()  # a run without metrics.json is left out
    result = run("-m", "experiments", "table", str(runs))
    assert result.returncode == 0, result.stderr
    for name in ("central", "segviz"):
        dice = json.loads((runs / name / "metrics.json").read_text())["dice"]["liver"]
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {name}-2 "))
        assert f"{dice['mean']:.3f} ± {dice['std']:.3f}" in row
    assert run("-m", "experiments", "table", str(tmp_path / "none")).returncode == 2
