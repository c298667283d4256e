"""The statistics: pairs matched by (seed, case name) or refused, the hierarchical bootstrap's
interval and p-value, Holm's adjustment."""

import numpy as np
import pytest

from experiments import stats


def values(per_seed):
    return {s: {f"case_{i}": v for i, v in enumerate(vs)} for s, vs in per_seed.items()}


def test_pairs_are_matched_by_seed_and_case_name_not_by_position():
    a = {0: {"b": 0.9, "a": 0.5}, 1: {"a": 0.7, "b": 0.6}}
    b = {0: {"a": 0.4, "b": 0.8}, 1: {"b": 0.6, "a": 0.2}}
    got = stats.paired_differences(a, b)
    np.testing.assert_allclose(got[0], [0.1, 0.1])  # a: 0.5 - 0.4, b: 0.9 - 0.8
    np.testing.assert_allclose(got[1], [0.5, 0.0])


@pytest.mark.parametrize("other, says", [
    ({0: {"a": 0.4, "b": 0.8}}, "seeds"),
    ({0: {"a": 0.4, "c": 0.8}, 1: {"a": 0.1, "b": 0.2}}, "seed 0: test cases"),
])
def test_rows_whose_seed_and_case_pairs_differ_are_refused(other, says):
    a = {0: {"a": 0.5, "b": 0.9}, 1: {"a": 0.7, "b": 0.6}}
    with pytest.raises(stats.Mismatch, match=says):
        stats.compare(a, other)


def test_the_difference_is_the_mean_over_seeds_and_its_interval_covers_the_seeds_spread():
    rng = np.random.default_rng(0)
    # five seeds whose whole models differ by +0.02 .. +0.10, cases scattered around them
    shifts = [0.02, 0.04, 0.06, 0.08, 0.10]
    a = values({s: list(0.8 + shift + rng.normal(0, 0.01, 8)) for s, shift in enumerate(shifts)})
    b = values({s: [0.8] * 8 for s in range(5)})
    got = stats.compare(a, b)
    assert got["difference"] == pytest.approx(0.06, abs=0.01)
    assert 0.02 < got["low"] < 0.06 < got["high"] < 0.10
    assert got["p"] < 0.01 and got["seeds"] == 5
    # what the seeds disagree on is not significant, however many cases each has
    mixed = values({s: list(0.8 + shift + rng.normal(0, 0.001, 50))
                    for s, shift in enumerate([-0.05, 0.05, -0.04, 0.04, 0.0])})
    loose = stats.compare(mixed, values({s: [0.8] * 50 for s in range(5)}))
    assert loose["low"] < 0 < loose["high"] and loose["p"] > 0.2


def test_identical_rows_differ_by_zero_with_p_one():
    a = values({0: [0.5, 0.6], 1: [0.7, 0.8]})
    got = stats.compare(a, a)
    assert (got["difference"], got["low"], got["high"], got["p"]) == (0.0, 0.0, 0.0, 1.0)


def test_holm_adjusts_step_down_and_keeps_the_order():
    adjusted = stats.holm([0.01, 0.04, None, 0.03, 0.005])
    # sorted: 0.005 x 4, 0.01 x 3, 0.03 x 2, 0.04 x 1, each at least the one before
    assert adjusted == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert stats.mark(0.049) == "*" and stats.mark(0.05) == "" and stats.mark(None) == ""
