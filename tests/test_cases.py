"""Where a run's cases come from: the phantom's sizes under --max-cases and --train-cases, and
real data reached only when a run names it."""

import sys

from cases import phantom_spec
from settings import resolve


def test_train_cases_caps_the_sites_and_leaves_the_test_set_whole():
    full = phantom_spec(resolve({})).cases
    assert full == {"liver": 10, "spleen": 6, "pancreas": 9, "kidneys": 9, "test": 8}
    two = phantom_spec(resolve({"train_cases": 2})).cases
    assert two == {"liver": 2, "spleen": 2, "pancreas": 2, "kidneys": 2, "test": 8}
    # --max-cases caps the test set too, and the smaller cap wins
    both = phantom_spec(resolve({"train_cases": 3, "max_cases": 1})).cases
    assert set(both.values()) == {1}
    assert phantom_spec(resolve({"train_cases": 7})).cases["spleen"] == 6


def test_a_run_on_the_phantom_never_imports_real_data(tmp_path, cache):
    from cases import load_federation

    sys.modules.pop("realdata.federation", None)
    cfg = resolve({"nodes": 1, "max_cases": 1, "spacing": (6.0, 6.0, 6.0), "cache": str(cache)})
    train, test, info = load_federation(cfg)
    assert info == {"source": "phantom"} and len(train["liver"]) == 1 and len(test) == 1
    assert "realdata.federation" not in sys.modules
