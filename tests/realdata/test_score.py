"""`python -m realdata score`: a folder of predictions against a folder of label maps, case by
case name; the numbers those of metrics.py in the label's voxel spacing; bad pairs named, the good
ones still scored, the exit status saying which."""

import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import ROOT
from metrics import NSD_TOLERANCE_MM, dice, hd95, surface_dice
from realdata import score

# array axis 0 runs along A at 1.2 mm, axis 1 along S at 2.5 mm, axis 2 along R at 0.8 mm: the
# spacing must be read per array axis, not per R, A, S
AFFINE = np.array([[0, 0, 0.8, -20], [1.2, 0, 0, 10], [0, 2.5, 0, -50], [0, 0, 0, 1.0]])
SPACING = (1.2, 2.5, 0.8)
SHAPE = (40, 24, 36)
BTCV = {"liver": (6,), "spleen": (1,), "pancreas": (11,), "kidneys": (2, 3)}


def truth_map() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:25, 4:16, 3:20] = 6  # liver
    lab[28:36, 6:12, 24:32] = 1  # spleen
    lab[10:16, 16:20, 22:30] = 11  # pancreas
    lab[30:36, 14:20, 4:9] = 2  # right kidney
    lab[30:36, 14:20, 27:33] = 3  # left kidney
    return lab


def predictions(truth: np.ndarray) -> dict[str, np.ndarray]:
    """Case a: organs moved and trimmed, the kidneys' sides swapped (the two count as one organ);
    case b: the pancreas missed, a stray liver voxel far off."""
    a = truth.copy()
    a[a == 6] = 0
    a[np.roll(truth == 6, 2, axis=0)] = 6
    a[a == 1] = 0
    a[28:35, 6:12, 25:32] = 1
    right, left = a == 2, a == 3
    a[right], a[left] = 3, 2
    b = truth.copy()
    b[b == 11] = 0
    b[0, 0, 0] = 6
    return {"a": a, "b": b}


def save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture
def folders(tmp_path):
    labels, pred = tmp_path / "labels", tmp_path / "pred"
    labels.mkdir()
    pred.mkdir()
    truth = truth_map()
    for case in ("a", "b", "missing", "mismatch", "moved"):
        save(labels / f"{case}.nii.gz", truth)
    for case, data in predictions(truth).items():
        save(pred / f"{case}.nii.gz", data)
    save(pred / "mismatch.nii.gz", truth[:-1])
    moved = AFFINE.copy()
    moved[:3, 3] += 5.0  # 5 mm off: another grid
    save(pred / "moved.nii.gz", truth, moved)
    # what predict writes beside the label maps is not a case
    save(pred / "a_liver.nii.gz", np.zeros(SHAPE, np.int16))
    (pred / "labels.json").write_text("{}")
    (labels / "notes.txt").write_text("not a label map")
    return pred, labels


def test_good_cases_are_scored_as_metrics_scores_them_and_bad_pairs_named(folders, capsys):
    pred, labels = folders
    assert score.main(["-p", str(pred), "-l", str(labels)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: case")]
    assert len(errors) == 3, captured.err
    for case, why in (("missing", "no missing.nii.gz"), ("mismatch", "shape (39, 24, 36)"),
                      ("moved", "affine differs")):
        assert sum(f"case {case}:" in line and why in line for line in errors) == 1, errors
    assert "3 case(s) could not be scored: mismatch, missing, moved" in captured.err
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["case_names"] == ["a", "b"]
    assert [f["case"] for f in summary["failed"]] == ["mismatch", "missing", "moved"]
    assert summary["nsd_tolerance_mm"] == NSD_TOLERANCE_MM
    truth = truth_map()
    for i, prediction in enumerate(predictions(truth).values()):
        for organ, ids in BTCV.items():
            p, t = np.isin(prediction, ids), np.isin(truth, ids)
            expected = {
                "dice": dice(torch.from_numpy(p), torch.from_numpy(t)),
                "hd95": hd95(p, t, SPACING),
                "nsd": surface_dice(p, t, SPACING, NSD_TOLERANCE_MM),
            }
            for metric, value in expected.items():
                got = summary[metric][organ]["cases"][i]
                assert (got is None) if math.isnan(value) else got == pytest.approx(value, 1e-5)
    assert summary["dice"]["kidneys"]["cases"][0] == 1.0  # sides swapped: still the kidneys
    assert summary["dice"]["pancreas"]["cases"][1] == 0.0
    assert summary["hd95"]["pancreas"]["cases"][1] is None  # missed: no HD95, counted apart
    assert summary["nsd"]["pancreas"]["cases"][1] == 0.0
    assert 0 < summary["dice"]["liver"]["cases"][0] < summary["dice"]["liver"]["cases"][1] < 1
    for metric in ("dice", "hd95", "nsd"):
        for entry in summary[metric].values():
            finite = [v for v in entry["cases"] if v is not None]
            assert entry["mean"] == pytest.approx(np.mean(finite), abs=1e-5)
    assert "| pred " in captured.out and "NSD at 2 mm" in captured.out


def test_every_good_pair_exits_0_and_the_summary_goes_where_asked(folders, tmp_path):
    pred, labels = folders
    for case in ("missing", "mismatch", "moved"):
        (labels / f"{case}.nii.gz").unlink()
    out = tmp_path / "elsewhere" / "scores.json"
    result = subprocess.run(
        [sys.executable, "-m", "realdata", "score", "-p", str(pred), "-l", str(labels),
         "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["case_names"] == ["a", "b"]
    assert not (pred / "summary.json").exists()
    assert "2 case(s) scored, 0 pair(s) could not be" in result.stdout


def test_another_id_mapping_scores_only_the_organs_it_names(folders):
    pred, labels = folders
    (labels / "missing.nii.gz").unlink()
    assert score.main(["-p", str(pred), "-l", str(labels), "--ids", "liver=6", "kidneys=2,3"]) == 1
    summary = json.loads((pred / "summary.json").read_text())
    assert list(summary["dice"]) == ["liver", "kidneys"]
    assert summary["ids"] == {"liver": [6], "kidneys": [2, 3]}
    # the right kidney alone, under the name "kidneys": the swapped sides now miss
    assert score.main(["-p", str(pred), "-l", str(labels), "--ids", "kidneys=2"]) == 1
    assert json.loads((pred / "summary.json").read_text())["dice"]["kidneys"]["cases"][0] == 0.0


@pytest.mark.parametrize("argv, message", [
    (["-p", "{tmp}/absent", "-l", "{labels}"], "-p {tmp}/absent: no such folder"),
    (["-p", "{pred}", "-l", "{tmp}/absent"], "-l {tmp}/absent: no such folder"),
    (["-p", "{pred}", "-l", "{pred}/../empty"], "no NIfTI image"),
    (["-p", "{pred}", "-l", "{labels}", "--ids", "heart=3"], "ORGAN=ID"),
    (["-p", "{pred}", "-l", "{labels}", "--ids", "liver=x"], "ORGAN=ID"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, folders, tmp_path, capsys):
    pred, labels = folders
    (tmp_path / "empty").mkdir()
    names = {"tmp": tmp_path, "pred": pred, "labels": labels}
    with pytest.raises(SystemExit) as e:
        score.main([a.format(**names) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message.format(**names) in err and err.strip().splitlines()[-1].count("error") == 1
    assert not (pred / "summary.json").exists()
