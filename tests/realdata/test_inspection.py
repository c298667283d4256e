"""`python -m realdata inspect`: every site's report, and a broken copy's problems with exit 1."""

import json
import os
import subprocess
import sys

import pytest

import layouts
from helpers import ROOT

pytestmark = pytest.mark.skipif(bool(layouts.MISSING), reason=layouts.MISSING)



def test_inspect_reports_every_site_and_problems(root, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "realdata", "inspect", "--data-root", str(root), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    reports = {x["role"]: x for x in json.loads(r.stdout)}
    assert set(reports) == {"liver", "spleen", "pancreas", "kidneys", "test"}
    assert reports["kidneys"]["axis_codes"] == {"IPL": 1}
    assert reports["spleen"]["axis_codes"] == {"LPS": 1}
    assert reports["liver"]["label_voxels"]["2"] > 0  # the tumour label is seen before merging
    assert reports["test"]["shapes"] == {"122x101x112": 1}
    assert all(not x["problems"] for x in reports.values())

    # a broken copy: the problem is printed and the exit status says so
    broken = tmp_path / "broken"
    base = layouts.msd_spleen(broken)
    os.remove(base / "imagesTr" / "spleen_0.nii.gz")
    r = subprocess.run(
        [sys.executable, "-m", "realdata", "inspect", "--data", f"spleen={base}", "--nodes", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    assert "spleen_0.nii.gz, which does not exist" in r.stdout
    assert "no liver dataset found" in r.stdout
