"""The real-data tests' shared layouts: every public archive's folder, built from the real CT."""

import pytest

import layouts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    layouts.data_root(base)
    layouts.nnunet_kits(base / "other")
    layouts.btcv_monai(base / "other")
    return base
