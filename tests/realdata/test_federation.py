"""Which cases of a real site train and which validate: the original's split, a seeded fraction,
and the automatic rule that fits the folder."""

import pytest

from data import DataError
from realdata import archives
from realdata.federation import site_split, split_validation
from settings import resolve


def test_validation_split_original_and_seeded():
    pairs = [archives.Pair(f"c{i:03d}", f"i{i}", f"l{i}") for i in range(40)]
    train, val, _ = split_validation(pairs, "spleen", "original")
    assert [p.name for p in val] == [f"c{i:03d}" for i in range(31, 40)] and len(train) == 31
    a = split_validation(pairs, "spleen", "0.25", seed=3)
    b = split_validation(pairs, "spleen", "0.25", seed=3)
    assert [p.name for p in a[1]] == [p.name for p in b[1]] and len(a[1]) == 10
    assert {p.name for p in a[0]}.isdisjoint(p.name for p in a[1])
    with pytest.raises(DataError, match="liver: 3 case"):
        split_validation(pairs[:3], "liver", "original")
    train, val, rule = split_validation(pairs, "spleen", "0")
    assert (len(train), val, rule) == (40, [], "every case trains, none held out")


def test_automatic_split_fits_the_folder():
    def names(n):
        return [archives.Pair(f"c{i:03d}", f"i{i}", f"l{i}") for i in range(n)]

    # the original archive (41 spleen cases): the original's last 9
    train, val, rule = split_validation(names(41), "spleen", "auto")
    assert [p.name for p in val] == [f"c{i:03d}" for i in range(32, 41)] and "original" in rule
    # a smaller hospital: a fifth, at least one, seeded
    for n, held in ((8, 2), (3, 1), (2, 1)):
        train, val, rule = split_validation(names(n), "liver", "auto", seed=1)
        assert (len(train), len(val)) == (n - held, held) and "fifth" in rule
        assert {p.name for p in train}.isdisjoint(p.name for p in val)
    assert split_validation(names(8), "liver", "auto", seed=1)[1] != split_validation(
        names(8), "liver", "auto", seed=2)[1]
    # one case: nothing to hold out, trains on it and says so
    train, val, rule = split_validation(names(1), "kidneys", "auto")
    assert len(train) == 1 and val == [] and "too few" in rule


def test_train_cases_caps_a_real_sites_training_part_and_leaves_its_validation_whole():
    pairs = [archives.Pair(f"c{i:03d}", f"i{i}", f"l{i}") for i in range(10)]
    source = archives.Source("liver", "msd", "root", pairs, (1, 2))
    whole = site_split(source, resolve({"val_split": "0.2"}))
    capped = site_split(source, resolve({"val_split": "0.2", "train_cases": 3}))
    assert [p.name for p in capped[0].pairs] == [p.name for p in whole[0].pairs][:3]
    assert capped[1].pairs == whole[1].pairs and len(whole[1].pairs) == 2
