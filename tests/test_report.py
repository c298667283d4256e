"""Summaries and tables of scores: means and population spreads over cases, undefined values
left out and counted, tables that show what is missing."""

import pytest

from report import across_seeds, format_metric_tables, format_table, summarise


def test_summarise_mean_and_population_std():
    s = summarise({"liver": [0.4, 0.6], "spleen": [0.1, 0.2, 0.6]})
    assert s["liver"]["mean"] == pytest.approx(0.5)
    assert s["liver"]["std"] == pytest.approx(0.1)  # the sample std would be 0.1414
    assert s["spleen"]["mean"] == pytest.approx(0.3)
    assert s["spleen"]["std"] == pytest.approx((((0.2**2) + (0.1**2) + (0.3**2)) / 3) ** 0.5)
    assert s["liver"]["cases"] == [0.4, 0.6]


def test_summarise_single_case_has_zero_std():
    s = summarise({"pancreas": [0.73]})
    assert s["pancreas"]["mean"] == pytest.approx(0.73)
    assert s["pancreas"]["std"] == 0.0


def table_row(table, name):
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {name} ")]
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_format_table_shows_mean_and_std_and_a_dash_for_missing_organs():
    rows = {
        "segviz": summarise({"liver": [0.4, 0.6]}),
        "other": summarise({"spleen": [0.25, 0.25]}),
    }
    table = format_table(rows, ("liver", "spleen"))
    assert "0.500 ± 0.100" in table
    assert table_row(table, "segviz") == ["segviz", "0.500 ± 0.100", "—"]
    assert table_row(table, "other") == ["other", "—", "0.250 ± 0.000"]
    # header, separator, one line per model
    assert len(table.splitlines()) == 4
    assert [c.strip() for c in table.splitlines()[0].strip("|").split("|")] == [
        "model",
        "liver",
        "spleen",
    ]


def test_summarise_leaves_undefined_values_out_of_the_mean_and_counts_them():
    s = summarise(
        {"liver": [2.0, float("nan"), 4.0], "spleen": [float("nan")] * 2, "pancreas": [0.5]}
    )
    assert s["liver"] == {"mean": 3.0, "std": 1.0, "cases": [2.0, None, 4.0], "nan": 1}
    assert s["spleen"] == {"mean": None, "std": None, "cases": [None, None], "nan": 2}
    assert "nan" not in s["pancreas"]  # Dice is always defined: its summary is as before


def test_format_table_shows_how_many_cases_had_no_value():
    hd = summarise({"liver": [10.0, float("nan"), 14.0], "spleen": [float("nan")]})
    table = format_table({"segviz": hd}, ("liver", "spleen"), digits=1)
    assert table_row(table, "segviz") == ["segviz", "12.0 ± 2.0 (1 nan)", "nan (1 nan)"]
    both = format_metric_tables(
        {"segviz": {"dice": summarise({"liver": [0.5]}), "hd95": hd}}, ("liver",)
    )
    dice_part, hd_part = both.split("\n\n")
    assert (
        "0.500 ± 0.000" in dice_part
        and hd_part.startswith("HD95 in mm")
        and "12.0 ± 2.0 (1 nan)" in hd_part
    )


def test_across_seeds_is_the_mean_and_sample_std_of_each_seeds_mean():
    seeds = [
        summarise({"liver": [0.7, 0.9]}),
        summarise({"liver": [0.6, 0.6]}),
        summarise({"liver": [0.7]}),
    ]
    entry = across_seeds(seeds, "liver")
    # ddof 1 over 3 seeds
    assert entry["mean"] == pytest.approx(0.7) and entry["std"] == pytest.approx(0.1)
    assert entry["seeds"] == [0.8, 0.6, 0.7] and entry["cases"] == [[0.7, 0.9], [0.6, 0.6], [0.7]]
    assert across_seeds(seeds, "spleen") is None
