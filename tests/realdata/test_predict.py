"""`python -m realdata predict`: a folder of scans in, a label map per scan on its own grid out; bad
scans named and skipped, finished ones not redone, probabilities on request; kidneys by side."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from checkpoint import model_checkpoint
from data import ORGAN_ID
from helpers import ROOT
from metrics import dice
from realdata import predict
from realdata.archives import BTCV_LEFT_KIDNEY, BTCV_RIGHT_KIDNEY
from realdata.labeltables import LABEL_FILES
from segviz import MetaModel
from settings import resolve
from unet3d import UNet3D, UNetConfig

BTCV = {"liver": 6, "spleen": 1}


def tiny_checkpoint(path, spacing=(6.0, 6.0, 6.0), source=None) -> str:
    """A checkpoint as train.py writes one for `--mode segviz --nodes 2`, with a tiny untrained net.
    """
    unet = UNetConfig(classes=2, channels=(4, 8), norm="instance")
    torch.manual_seed(0)
    states = {site: UNet3D(unet).state_dict() for site in ("liver", "spleen")}
    cfg = resolve(
        {
            "nodes": 2,
            "mode": "segviz",
            "channels": (4, 8),
            "spacing": tuple(spacing),
            "patch": (16, 16, 16),
            "largest": False,
        }
    )
    windows = {"liver": (-200.0, 200.0), "spleen": (-57.0, 164.0)}
    torch.save(
        model_checkpoint(
            cfg, "segviz-2", ["liver", "spleen"], unet, states, False, windows, {}, source or {},
            {},
        ),
        path,
    )
    return str(path)


def ct(shape, affine, bright=None, dtype=np.int16) -> nib.Nifti1Image:
    """Air around a soft-tissue body; `bright` (array slices) at 200 HU."""
    data = np.full(shape, -1000, dtype)
    data[2:-2, 2:-2, 1:-1] = 40
    if bright is not None:
        data[bright] = 200
    return nib.Nifti1Image(data, affine)


# L, S, P axes
FLIPPED = np.array([[-4.0, 0, 0, 90], [0, 0, 5.0, -40], [0, -4.0, 0, 60], [0, 0, 0, 1]])


def scan_folder(folder) -> dict[str, str]:
    """Two good scans (different shapes, one stored with a flipped and permuted affine) and
    four bad ones; returns {what: path}."""
    folder.mkdir()
    paths = {
        "a": folder / "case_a.nii.gz",
        "b": folder / "case_b_0000.nii.gz",
        "truncated": folder / "broken.nii.gz",
        "2d": folder / "flat.nii",
        "nan": folder / "nan.nii.gz",
        "affine": folder / "singular.nii.gz",
    }
    nib.save(ct((30, 26, 20), np.diag([5.0, 5.0, 5.0, 1.0])), paths["a"])
    nib.save(ct((24, 16, 28), FLIPPED), paths["b"])
    whole = paths["a"].read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.int16), np.eye(4)), paths["2d"])
    nan = np.zeros((20, 20, 10), np.float32)
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), paths["nan"])
    # the header's own
    singular = nib.Nifti1Image(ct((20, 20, 10), np.eye(4)).get_fdata().astype(np.int16), None)
    singular.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a zero voxel axis
    singular.header.set_qform(None, code=0)
    nib.save(singular, paths["affine"])
    (folder / "notes.txt").write_text("not a scan")
    (folder / "._case_a.nii.gz").write_bytes(b"macOS resource fork")
    return {k: str(v) for k, v in paths.items()}


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "realdata", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_predict_a_folder_skips_bad_scans_and_finished_ones_and_overwrites_on_request(tmp_path):
    scans = scan_folder(tmp_path / "in")
    model = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    argv = (
        "predict",
        "-i",
        str(tmp_path / "in"),
        "-o",
        str(out),
        "--checkpoint",
        model,
        "--device",
        "cpu",
    )
    first = run(*argv)
    assert first.returncode == 1, first.stderr[-2000:]
    # nnU-Net's _0000 dropped
    assert sorted(os.listdir(out)) == sorted(["case_a.nii.gz", "case_b.nii.gz", *LABEL_FILES])
    for case, scan in (("case_a", scans["a"]), ("case_b", scans["b"])):
        image, label = nib.load(scan), nib.load(out / f"{case}.nii.gz")
        assert label.shape == image.shape and np.array_equal(label.affine, image.affine)
        assert label.get_data_dtype() == np.uint8
        # the checkpoint's organs
        assert set(np.unique(np.asanyarray(label.dataobj))) <= {0, *BTCV.values()}
    errors = first.stderr.strip().splitlines()
    bad = [scans[k] for k in ("truncated", "2d", "nan", "affine")]
    for path, why in zip(bad, ("cannot be read as NIfTI", "2-D", "NaN", "no usable affine")):
        assert sum(path in line and why in line for line in errors) == 1, (path, first.stderr)
    assert all(p in errors[-1] for p in bad) and "4 scan(s) could not be segmented" in errors[-1]
    assert "2 scan(s) segmented" in first.stdout

    def label_maps():
        return {f: (out / f).stat().st_mtime_ns for f in os.listdir(out) if f.endswith(".nii.gz")}

    written = label_maps()
    again = run(*argv)
    assert again.returncode == 1 and again.stdout.count("already written, skipped") == 2
    assert "0 scan(s) segmented" in again.stdout and all(p in again.stderr for p in bad)
    assert label_maps() == written

    (out / "case_a.nii.gz").write_bytes(b"stale")
    forced = run(*argv, "--overwrite")
    assert forced.returncode == 1 and "2 scan(s) segmented" in forced.stdout
    assert nib.load(out / "case_a.nii.gz").shape == (30, 26, 20)
    assert not [f for f in os.listdir(out) if f.startswith(".")], "no temporary file left behind"


def test_predict_exits_0_when_every_scan_is_good(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(ct((30, 26, 20), np.diag([5.0, 5.0, 5.0, 1.0])), folder / "one.nii")
    result = run("predict", "-i", str(folder), "-o", str(tmp_path / "out"), "--checkpoint",
                 tiny_checkpoint(tmp_path / "model.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["one.nii.gz", *LABEL_FILES])


class Bright(MetaModel):
    """A stand-in for a trained SegViz model: the liver is whatever is brighter than 100 HU."""

    def __init__(self):
        torch.nn.Module.__init__(self)

    def forward(self, hu):
        liver = (hu > 100).float()
        return torch.cat([liver, torch.zeros_like(liver)], dim=1)


def test_labels_and_probabilities_land_on_the_scans_own_voxels_whatever_its_orientation(
    tmp_path, monkeypatch
):
    # the working spacing equals the scan's voxels (4, 5, 4 mm in R, A, S), so the label map must
    # be exactly the bright block and the probabilities exactly 0 and 1
    folder = tmp_path / "in"
    folder.mkdir()
    # array indices as stored, under an L,S,P affine
    block = (slice(3, 9), slice(10, 14), slice(5, 20))
    scan = ct((24, 16, 28), FLIPPED, bright=block)
    scan.header["cal_min"], scan.header["cal_max"], scan.header["descrip"] = (
        -1024,
        3071,
        b"CT abdomen",
    )
    nib.save(scan, folder / "b.nii.gz")
    model = tiny_checkpoint(tmp_path / "model.pt", spacing=(4.0, 5.0, 4.0))
    monkeypatch.setattr(predict, "model_of", lambda ckpt: Bright())
    out = tmp_path / "out"
    assert (
        predict.main(["-i", str(folder), "-o", str(out), "--checkpoint", model, "--save-prob"]) == 0
    )
    assert sorted(os.listdir(out)) == sorted(
        ["b.nii.gz", "b_liver.nii.gz", "b_spleen.nii.gz", *LABEL_FILES]
    )
    expected = np.zeros((24, 16, 28), np.uint8)
    expected[block] = BTCV["liver"]
    assert np.array_equal(np.asanyarray(nib.load(out / "b.nii.gz").dataobj), expected)
    liver, spleen = nib.load(out / "b_liver.nii.gz"), nib.load(out / "b_spleen.nii.gz")
    assert liver.get_data_dtype() == np.int16 and np.array_equal(liver.affine, FLIPPED)
    # the scale factor brings back [0, 1]
    np.testing.assert_allclose(liver.get_fdata(), expected > 0, atol=1e-4)
    np.testing.assert_allclose(spleen.get_fdata(), 0, atol=1e-4)
    # the scan's orientation codes carry over, not its CT display range (a viewer would open 0-11 at
    # -1024..3071)
    for written in (nib.load(out / "b.nii.gz"), liver):
        assert written.header["qform_code"] == scan.header["qform_code"]
        assert (float(written.header["cal_min"]), float(written.header["cal_max"])) == (0.0, 0.0)
        assert written.header["descrip"].tobytes().strip(b"\0") == b""
    # a second run with probabilities asked for again finds everything written
    assert (
        predict.main(["-i", str(folder), "-o", str(out), "--checkpoint", model, "--save-prob"]) == 0
    )


def sphere_scan(shape=(40, 36, 32), voxel=2.0, radius=17.0):
    """A body (40 HU) in air with a bright ball (200 HU) off its middle, R,A,S at `voxel` mm;
    returns the HU array, its affine and the ball's mask."""
    centres = (np.indices(shape).transpose(1, 2, 3, 0) + 0.5) * voxel
    ball = np.linalg.norm(centres - np.array([37.0, 33.0, 30.0]), axis=-1) <= radius
    hu = np.full(shape, -1000, np.int16)
    hu[3:-3, 3:-3, 2:-2] = 40
    hu[ball] = 200
    affine = np.diag([voxel, voxel, voxel, 1.0])
    affine[:3, 3] = (-40.0, 12.0, -90.0)
    return hu, affine, ball


def test_resampled_labels_and_probabilities_land_on_the_scans_voxels_in_any_orientation(
    tmp_path, monkeypatch
):
    # the model sees the ball at 5 mm; its labels come back on the 2 mm grid the scan is stored
    # on, in the scan's own array order, the same in space whatever that order is
    import layouts

    hu, affine, ball = sphere_scan()
    folder, out = tmp_path / "in", tmp_path / "out"
    orders = ("RAS", "LPI", "IPL", "SAR")
    for codes in orders:
        layouts.save(folder / f"{codes}.nii.gz", *layouts.reoriented(hu, affine, codes))
    model = tiny_checkpoint(tmp_path / "model.pt", spacing=(5.0, 5.0, 5.0))
    monkeypatch.setattr(predict, "model_of", lambda ckpt: Bright())
    argv = ["-i", str(folder), "-o", str(out), "--checkpoint", model, "--save-prob"]
    assert predict.main(argv) == 0
    found = {}
    for codes in orders:
        scan = nib.load(folder / f"{codes}.nii.gz")
        label, prob = nib.load(out / f"{codes}.nii.gz"), nib.load(out / f"{codes}_liver.nii.gz")
        for written in (label, prob):
            assert written.shape == scan.shape and np.array_equal(written.affine, scan.affine)
        labels, _ = layouts.reoriented(np.asanyarray(label.dataobj), scan.affine, "RAS")
        liver, _ = layouts.reoriented(prob.get_fdata(), scan.affine, "RAS")
        assert set(np.unique(labels)) == {0, BTCV["liver"]}
        found[codes] = labels == BTCV["liver"]
        # the probability written is the one resampled (values between 0 and 1 at the ball's
        # edge, where a nearest neighbour would copy the working grid's 0s and 1s), and the
        # label map is where it exceeds a half
        assert ((liver > 0.05) & (liver < 0.95)).sum() > 100
        clear = np.abs(liver - 0.5) > 1e-3
        assert np.array_equal(found[codes][clear], liver[clear] > 0.5)
    assert dice(torch.from_numpy(found["RAS"]), torch.from_numpy(ball)) > 0.9
    for codes in orders[1:]:  # voxel for voxel in space
        assert np.array_equal(found[codes], found["RAS"]), codes


@pytest.mark.parametrize("scoring", ["merged", "heads", "classes"])
def test_masks_on_the_scans_grid_follow_each_modes_rule_and_end_at_the_body_box(scoring):
    # the liver fills the body box (working voxels 1..4 of 6, each axis) and outside it there is
    # no organ, the multi-class background included; at twice the resolution the liver's share of
    # scan voxels 2 and 9 is 3/4 along an axis (1 at 3..8, 0 beyond), so it takes the voxels
    # where the product over the axes exceeds a half: scan voxels 2..9, less the 8 corners
    geometry = {"resampled": [6, 6, 6], "ras_shape": [12, 12, 12], "box": [[1, 5]] * 3}
    liver, spleen = torch.ones(4, 4, 4), torch.zeros(4, 4, 4)
    scores = torch.stack([1 - liver, liver, spleen] if scoring == "classes" else [liver, spleen])
    masks = predict.masks_on_scan(scores, ["liver", "spleen"], scoring, geometry, largest=False)
    share = torch.tensor([0, 0, 0.75, 1, 1, 1, 1, 1, 1, 0.75, 0, 0])
    expected = share[:, None, None] * share[None, :, None] * share[None, None, :] > 0.5
    assert int(expected.sum()) == 8**3 - 8
    assert torch.equal(masks["liver"], expected) and not masks["spleen"].any()


@pytest.mark.parametrize("largest", [False, True])
def test_the_clean_up_runs_on_the_scans_grid_when_the_checkpoint_says_so(largest):
    geometry = {"resampled": [8, 8, 8], "ras_shape": [8, 8, 8], "box": [[0, 8]] * 3}
    liver = torch.zeros(8, 8, 8)
    liver[1:5, 1:5, 1:5], liver[7, 7, 7] = 1, 1  # the organ and a stray voxel
    masks = predict.masks_on_scan(
        torch.stack([liver, torch.zeros_like(liver)]), ["liver", "spleen"], "merged", geometry,
        largest,
    )
    assert int(masks["liver"].sum()) == 64 + (0 if largest else 1)


def test_missing_probabilities_are_written_on_a_second_run(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(ct((20, 20, 12), np.diag([6.0, 6.0, 6.0, 1.0])), folder / "c.nii.gz")
    model = tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    argv = ["predict", "-i", str(folder), "-o", str(out), "--checkpoint", model]
    assert predict.main(argv[1:]) == 0
    assert sorted(os.listdir(out)) == sorted(["c.nii.gz", *LABEL_FILES])
    assert predict.main([*argv[1:], "--save-prob"]) == 0
    assert sorted(os.listdir(out)) == sorted(
        ["c.nii.gz", "c_liver.nii.gz", "c_spleen.nii.gz", *LABEL_FILES]
    )


@pytest.mark.parametrize("low, high, why", [
    (-1024, 3071, None),  # a CT
    (-1000, 60, "no bone"),  # air and soft tissue only
    (0, 1, "normalised"),
    (0, 255, "8-bit"),
    (0, 1800, "no air"),  # an MR image
    (-200, 1800, "no air"),
])
def test_the_ct_check_names_what_does_not_look_like_hounsfield_units(low, high, why):
    image = np.linspace(low, high, 1000, dtype=np.float32).reshape(10, 10, 10)
    warning = predict.ct_warning(image)
    assert (warning is None) if why is None else (why in warning and f"{low:g} to" in warning)


def test_suspect_scans_and_a_phantom_checkpoint_warn_in_one_line_and_the_run_goes_on(
    tmp_path, capsys
):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 1500, (20, 20, 12)).astype(np.float32)  # MR-like: no air, no HU
    nib.save(nib.Nifti1Image(mr, np.diag([6.0, 6.0, 6.0, 1.0])), folder / "mr.nii.gz")
    nib.save(nib.Nifti1Image(mr / 1500, np.diag([6.0, 6.0, 6.0, 1.0])), folder / "unit.nii.gz")
    nib.save(ct((20, 20, 12), np.diag([6.0, 6.0, 6.0, 1.0]), bright=np.s_[5:9, 5:9, 3:6]),
             folder / "ct.nii.gz")
    model = tiny_checkpoint(tmp_path / "model.pt", source={"source": "phantom"})
    assert predict.main(["-i", str(folder), "-o", str(out), "--checkpoint", model]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 3, warnings
    assert sum(model in w and "phantom" in w for w in warnings) == 1
    assert sum("mr.nii.gz" in w and "no air" in w for w in warnings) == 1
    assert sum("unit.nii.gz" in w and "normalised" in w for w in warnings) == 1
    assert all((out / f"{case}.nii.gz").exists() for case in ("mr", "unit", "ct"))
    # a checkpoint trained on real data, and real CT: no warning
    real = tiny_checkpoint(tmp_path / "real.pt", source={"source": "real"})
    (folder / "mr.nii.gz").unlink()
    (folder / "unit.nii.gz").unlink()
    fresh = tmp_path / "again"
    assert predict.main(["-i", str(folder), "-o", str(fresh), "--checkpoint", real]) == 0
    assert "warning" not in capsys.readouterr().err and (fresh / "ct.nii.gz").exists()


@pytest.mark.parametrize("setup, message", [
    ("empty", "no NIfTI image"), ("missing", "no such folder"), ("same", "is where the scans are"),
    ("duplicate", "are both case x"), ("not nifti", "not a NIfTI image"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(setup, message, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    out = tmp_path / "out"
    if setup == "duplicate":
        for name in ("x.nii", "x_0000.nii.gz"):
            nib.save(ct((8, 8, 8), np.eye(4)), folder / name)
    if setup == "same":
        nib.save(ct((8, 8, 8), np.eye(4)), folder / "x.nii.gz")
        out = folder
    if setup == "not nifti":
        folder = folder / "notes.txt"
        folder.write_text("x")
    if setup == "missing":
        folder = tmp_path / "absent"
    with pytest.raises(SystemExit) as e:
        predict.main(
            ["-i", str(folder), "-o", str(out), "--checkpoint", str(tmp_path / "absent.pt")]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data, why", [
    (np.zeros((6, 6, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]), "voxels of type"),
    (np.zeros((6, 6, 6), np.complex64), "voxels of type"),
    (np.zeros((0, 6, 6), np.int16), "empty volume|1-D volume"),  # nibabel reads it back as (0,)
    (np.zeros((6, 6, 6, 2), np.int16), "4-D"),
])
def test_scans_that_are_not_a_ct_are_named_and_refused(data, why, tmp_path):
    from data import DataError

    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(DataError, match=why) as e:
        predict.read_scan(str(path))
    assert str(path) in str(e.value)


def test_one_scan_may_be_given_instead_of_a_folder(tmp_path):
    scan = tmp_path / "scan_0000.nii.gz"
    nib.save(ct((20, 20, 12), np.diag([6.0, 6.0, 6.0, 1.0])), scan)
    assert predict.list_scans(str(scan)) == [("scan", str(scan))]


def test_the_real_ct_is_segmented_on_its_own_grid_in_any_orientation(tmp_path, monkeypatch):
    import layouts

    if layouts.MISSING:
        pytest.skip(layouts.MISSING)
    image, _, affine = layouts.real_ct()
    folder = tmp_path / "in"
    layouts.save(folder / "ras.nii.gz", image, affine)
    ipl, ipl_affine = layouts.reoriented(image, affine, "IPL")  # as KiTS19 stores its scans
    layouts.save(folder / "ipl.nii.gz", ipl, ipl_affine)
    model = tiny_checkpoint(tmp_path / "model.pt", spacing=(6.0, 6.0, 6.0))
    monkeypatch.setattr(predict, "model_of", lambda ckpt: Bright())
    out = tmp_path / "out"
    assert predict.main(["-i", str(folder), "-o", str(out), "--checkpoint", model]) == 0
    ras, back = nib.load(out / "ras.nii.gz"), nib.load(out / "ipl.nii.gz")
    assert ras.shape == image.shape and np.array_equal(
        ras.affine, nib.load(folder / "ras.nii.gz").affine
    )
    assert back.shape == ipl.shape and np.array_equal(
        back.affine, nib.load(folder / "ipl.nii.gz").affine
    )
    # the same scan stored two ways gets the same labels, voxel for voxel in space
    labels = np.asanyarray(ras.dataobj)
    assert (labels == BTCV["liver"]).sum() > 1000  # bone and contrast are brighter than 100 HU
    again, _ = layouts.reoriented(np.asanyarray(back.dataobj), back.affine, "RAS")
    assert np.array_equal(again, labels)


def test_kidney_sides_follow_the_two_kidneys_not_the_middle_of_the_volume():
    # a body off the middle of the volume (a wide table): both kidneys lie at high x, the left
    # one (low x) right of the volume's middle; a small fragment beside the right kidney
    lab = np.zeros((60, 20, 10), np.uint8)
    k = ORGAN_ID["kidneys"]
    lab[34:40, 5:15, 2:8] = k  # left kidney
    lab[50:56, 5:15, 2:8] = k  # right kidney
    lab[58, 5, 2] = k  # a stray voxel, far right
    ids = predict.to_btcv_ids(torch.from_numpy(lab))
    right, left = BTCV_RIGHT_KIDNEY, BTCV_LEFT_KIDNEY
    assert (
        (ids[34:40, 5:15, 2:8] == left).all()
        and (ids[50:56, 5:15, 2:8] == right).all()
        and ids[58, 5, 2] == right
    )
    # one kidney alone (or two fragments that overlap in x) keeps the volume's middle
    one = np.zeros_like(lab)
    one[20:26, 5:15, 2:8] = k
    one[22:24, 16:18, 2:4] = k
    assert set(np.unique(predict.to_btcv_ids(torch.from_numpy(one)))) == {0, left}
