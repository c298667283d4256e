"""The benchmarks: a partial run of `speed` updates only what it measured; `preprocess` runs;
`exchange` counts what training sends."""

import json
import os
import subprocess
import sys

import pytest

from bench import __main__ as bench
from bench import resources, speed
from helpers import ROOT


def test_speed_only_dice_keeps_the_other_parts_of_the_entry(tmp_path, capsys):
    out = tmp_path / "bench.json"
    sampling = {"phantom": {"patches_per_call": 2, "patch": [48, 48, 32], "volume": [9, 9, 9],
                            "ours_patches_per_s": 5.0, "ratio": 1.5}}
    earlier = {
        "speed_cpu_quick": {"sampling": sampling, "dice": {"ratio": 0.1}},
        "exchange": {"kept": True},
    }
    out.write_text(json.dumps(earlier))
    assert (
        bench.main(["speed", "--quick", "--only", "dice", "--repeats", "1", "--out", str(out)]) == 0
    )
    data = json.loads(out.read_text())
    assert data["exchange"] == {"kept": True}
    entry = data["speed_cpu_quick"]
    assert entry["sampling"] == sampling  # not measured this time: kept
    assert entry["dice"]["cases"] == 4 and entry["dice"]["ours_cases_per_s"] > 0
    assert entry["dice"].get("ratio") != 0.1  # measured again (no ratio at all without MONAI)
    assert entry["dice"]["machine"] == entry["machine"]  # each part says where it was measured
    assert "Dice, 4 cases" in capsys.readouterr().out


def test_speed_table_prints_only_the_parts_it_has():
    partial = {"machine": "m", "device": "cpu", "monai": None, "quick": True,
               "dice": {"cases": 2, "shape": [8, 8, 8], "classes": 4, "ours_cases_per_s": 3.0}}
    table = speed.speed_table(partial)
    assert "Dice, 2 cases" in table and "sampling" not in table and "FL round" not in table


def test_a_partial_run_of_sampling_prints_its_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        bench.main(["speed", "--quick", "--only", "sampling", "--repeats", "1", "--out", str(out)])
        == 0
    )
    entry = json.loads(out.read_text())["speed_cpu_quick"]
    assert entry["sampling"]["machine"] and entry["sampling"]["phantom"]["ours_patches_per_s"] > 0
    assert "sampling, phantom" in capsys.readouterr().out


def test_preprocess_times_the_real_ct_and_a_synthetic_one(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tests", "realdata"))
    import layouts

    if layouts.MISSING:
        pytest.skip(layouts.MISSING)
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "preprocess",
            "--shape",
            "64",
            "64",
            "40",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--ct",
            str(layouts.REAL_CT / "ct.nii.gz"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())["preprocess"]
    assert result["real_ct"]["cache_bytes"] > 0 and len(result["real_ct"]["working_shape"]) == 3
    assert result["large_ct"]["voxels"] == 64 * 64 * 40 and result["large_ct"]["peak_rss_bytes"] > 0


def test_exchange_counts_the_keys_training_sends():
    # each preset's own network (phantom: instance norm, no buffers; paper: BatchNorm, whose
    # running statistics stay local as in the original)
    from settings import PRESETS, resolve
    from unet3d import UNet3D, UNetConfig

    rows = resources.bench_exchange(None)
    for name in PRESETS:
        preset = resolve({"preset": name})
        net = UNet3D(UNetConfig(channels=preset.channels, norm=preset.norm))
        rep_parameters = [k for k, _ in net.named_parameters() if k.startswith("rep.")]
        rep_keys = [k for k in net.state_dict() if k.startswith("rep.")]
        assert rows[name]["segviz"]["keys_total"] == len(net.state_dict())
        expected = rep_keys if preset.share_buffers else rep_parameters
        assert rows[name]["segviz"]["keys_sent"] == len(expected)
    assert rows["paper"]["segviz"]["keys_sent"] < len([k for k in UNet3D(UNetConfig(
        channels=PRESETS["paper"]["channels"], norm="batch")).state_dict() if k.startswith("rep.")])


def test_boundary_scores_both_paths_back_to_the_real_cts_grid(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tests", "realdata"))
    import layouts

    if layouts.MISSING:
        pytest.skip(layouts.MISSING)
    out = tmp_path / "bench.json"
    assert bench.main(["boundary", "--spacings", "3", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["boundary"]["by_spacing"]
    for path in ("nearest", "trilinear"):  # the CT's own spacing: both give its labels back
        assert all(v == 1.0 for v in result["3"][path]["dice"].values())
    coarse = result["6"]
    for organ in ("liver", "spleen", "pancreas", "kidneys"):
        for metric in ("dice", "nsd"):
            assert coarse["trilinear"][metric][organ] > coarse["nearest"][metric][organ], organ
    assert "| trilinear |" in capsys.readouterr().out
