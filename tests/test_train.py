"""One training run, top to bottom: its losses, the federation it builds, the state it saves and
restores, and (marked slow) runs end to end at a tiny size through train.py: their outputs,
resume after a kill, and their answers to bad input."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import fl
import train
from data import Case
from helpers import ROOT, SMALL, finished_run, run, tiny
from sampler import round_robin
from settings import REAL_DATA, Config, resolve


def test_unwritable_out_is_refused(tmp_path):
    # a path under a regular file cannot be created, whoever runs the test
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("train.py", "--out", str(blocker / "run"))
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert "--out" in err[-1] and ("not writable" in err[-1] or "not a folder" in err[-1])
    assert not (blocker.parent / "run").exists()


def test_dice_loss_is_zero_for_a_perfect_prediction_and_high_for_a_wrong_one():
    target = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    perfect = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 40 - 20
    assert float(train.dice_loss(perfect, target)) < 1e-4
    assert float(train.dice_loss(-perfect, target)) > 0.99


@pytest.mark.parametrize("classes", [2, 5])
def test_the_dice_loss_is_monais_dice_loss_as_the_original_used_it(classes):
    # DiceLoss(to_onehot_y=True, softmax=True): background included, per sample and class, the
    # same smoothing (1e-5 above and below); a patch without the organ is where an off
    # smoothing or a left-out background shows most
    monai = pytest.importorskip("monai")
    reference = monai.losses.DiceLoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(3, classes, 6, 5, 4, generator=g) * 3
    target = torch.randint(0, classes, (3, 6, 5, 4), generator=g)
    target[1] = 0  # this patch holds background only
    expected = reference(logits, target[:, None])
    torch.testing.assert_close(train.dice_loss(logits, target), expected, rtol=1e-6, atol=1e-7)
    # the loss with Dice + cross-entropy adds exactly the voxel-wise cross-entropy
    with_ce = expected + torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(train.dice_ce_loss(logits, target), with_ce, rtol=1e-6, atol=1e-7)


def test_round_robin_draws_from_each_site_in_turn():
    class Fake:
        def __init__(self, name):
            self.name = name

        def sample(self):
            return self.name

    nxt = round_robin([Fake("a"), Fake("b"), Fake("c")])
    assert [nxt() for _ in range(5)] == ["a", "b", "c", "a", "b"]


# The original's windows, written out: each binary head trains and is tested through its own
# site's window; the multi-class central model uses one window everywhere.
ORIGINAL_WINDOWS = {"liver": (-200.0, 200.0), "spleen": (-57.0, 164.0), "pancreas": (-87.0, 199.0),
                    "kidneys": (-79.0, 304.0)}
ORIGINAL_POOLED = (-200.0, 304.0)


@pytest.mark.parametrize("mode", ["segviz", "single", "central", "fedavg"])
def test_each_model_trains_through_the_originals_window(mode, monkeypatch, tmp_path):
    seen = {}

    def recording(cases, hu_window, *rest, **kw):
        seen[cases[0].name.split("-")[0]] = tuple(hu_window)
        return real(cases, hu_window, *rest, **kw)

    real = train.site_sampler
    monkeypatch.setattr(train, "site_sampler", recording)
    cases = {
        s: [
            Case(
                f"{s}-0",
                torch.zeros(48, 48, 32),
                torch.zeros(48, 48, 32, dtype=torch.uint8),
                (3.0,) * 3,
            )
        ]
        for s in ORIGINAL_WINDOWS
    }
    train.build_run(resolve({"mode": mode, "out": str(tmp_path)}), cases, train.Extensions())
    expected = (
        ORIGINAL_WINDOWS
        if mode in ("segviz", "single")
        else dict.fromkeys(ORIGINAL_WINDOWS, ORIGINAL_POOLED)
    )
    assert seen == expected


def test_a_saved_state_restores_validation_the_best_model_and_the_pooled_position(tmp_path):
    # what only some runs use (validation curves, keep="best", the central model's round-robin)
    # must come back from state.pt too
    cases = {
        s: [
            Case(
                f"{s}-{i}",
                torch.rand(48, 48, 32),
                (torch.rand(48, 48, 32) > 0.9).to(torch.uint8),
                (3.0,) * 3,
            )
            for i in range(2)
        ]
        for s in ("liver", "spleen")
    }
    cfg = resolve({"nodes": 2, "mode": "central", "out": str(tmp_path)})
    run = train.build_run(cfg, cases, train.Extensions())
    # moves the weights and the pooled position
    fl.local_train(run.model, run.optimizer, run.clients[0], 2)
    run.validation = [{"round": 4, "liver": 0.5, "spleen": 0.25}]
    run.best = {"round": 4, "score": 0.375, "states": {"pooled": dict(run.clients[0].model_state)}}
    run.log, run.norms = ["round 3: absent: spleen"], [{"pooled": 1.5}]
    position = run.pooled.position[0]
    assert position != 0
    train.save_state(run, 5)

    fresh = train.build_run(cfg, cases, train.Extensions())
    torch.manual_seed(123)  # the global RNG moves on after the save...
    assert train.restore_state(fresh, str(tmp_path / train.STATE_FILE)) == 5
    assert fresh.pooled.position[0] == position
    assert (fresh.validation, fresh.log, fresh.norms) == (run.validation, run.log, run.norms)
    assert fresh.best["round"] == 4 and fresh.best["score"] == 0.375
    assert all(
        torch.equal(fresh.best["states"]["pooled"][k], v)
        for k, v in run.best["states"]["pooled"].items()
    )
    assert all(
        torch.equal(fresh.clients[0].model_state[k], v)
        for k, v in run.clients[0].model_state.items()
    )
    assert torch.equal(
        fresh.samplers["liver"].gen.get_state(), run.samplers["liver"].gen.get_state()
    )


def test_a_restored_state_restores_torchs_global_random_state(tmp_path):
    # the global RNG draws what no generator of its own does (a variant's, dropout in a layer):
    # a resumed run must draw what the uninterrupted run draws next
    cases = {
        s: [
            Case(
                f"{s}-0",
                torch.rand(48, 48, 32),
                (torch.rand(48, 48, 32) > 0.9).to(torch.uint8),
                (3.0,) * 3,
            )
        ]
        for s in ("liver", "spleen")
    }
    cfg = resolve({"nodes": 2, "out": str(tmp_path)})
    run = train.build_run(cfg, cases, train.Extensions())
    torch.manual_seed(7)
    train.save_state(run, 1)
    expected = torch.rand(5)
    torch.manual_seed(8)
    train.restore_state(
        train.build_run(cfg, cases, train.Extensions()), str(tmp_path / train.STATE_FILE)
    )
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, extra, name",
    [
        ("segviz", [], "segviz-2"),
        ("single", [], "single-2"),
        ("central", [], "central-2"),
        ("fedavg", [], "fedavg-2"),
        ("segviz", ["--fedbn"], "segviz-fedbn-2"),
        ("central", ["--marginal"], "central-marginal-2"),
        ("fedavg", ["--marginal"], "fedavg-marginal-2"),
        ("central", ["--oracle"], "oracle-2"),
    ],
)
def test_every_mode_trains_evaluates_and_reloads(mode, extra, name, tmp_path, cache):
    out = tmp_path / "run" / "seed-0"  # each seed's run is in OUT/seed-S
    result = tiny(mode, out.parent, cache, *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == mode and metrics["nodes"] == 2 and metrics["name"] == name
    assert metrics["organs"] == ["liver", "spleen"]
    assert metrics["case_names"] == ["test_000", "test_001"]  # the case of each per-case value
    for organ in metrics["organs"]:
        d = metrics["dice"][organ]
        assert 0.0 <= d["mean"] <= 1.0 and len(d["cases"]) == 2
    assert "liver" in result.stdout and "±" in result.stdout
    # at test time each head sees its own site's window; a multi-class model the pooled one
    from checkpoint import model_of, read_checkpoint

    model = model_of(read_checkpoint(str(out / "model.pt")))
    if mode in ("segviz", "single"):
        assert model.windows == {s: ORIGINAL_WINDOWS[s] for s in ("liver", "spleen")}
    else:
        assert model.window == ORIGINAL_POOLED
    # the checkpoint alone reproduces the evaluation, into its own folder beside the checkpoint:
    # training's metrics.json (losses, events, curves) survives byte for byte
    trained = (out / "metrics.json").read_bytes()
    again = run("eval.py", "--checkpoint", str(out / "model.pt"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "metrics.json").read_bytes() == trained
    re_metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for organ in metrics["organs"]:
        assert re_metrics["dice"][organ]["cases"] == pytest.approx(
            metrics["dice"][organ]["cases"], abs=1e-6
        )


@pytest.mark.slow
def test_channels_reach_the_trained_model_and_its_checkpoint(tmp_path, cache):
    out = tmp_path / "run" / "seed-0"  # each seed's run is in OUT/seed-S
    result = tiny("segviz", out.parent, cache, "--channels", "4,8,16,32,64")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["unet"]["channels"] == ckpt["config"]["channels"] == [4, 8, 16, 32, 64]
    widths = {
        v.shape[0]
        for k, v in ckpt["states"]["liver"].items()
        if k.startswith("rep.") and k.endswith(".weight") and v.dim() == 5
    }
    assert {4, 8, 16, 32, 64} <= widths
    again = run("eval.py", "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", [[], ["--amp"]], ids=["fp32", "amp"])
def test_cuda_run_trains_evaluates_and_reloads_on_the_gpu(amp, tmp_path, cache):
    out = tmp_path / "run" / "seed-0"  # each seed's run is in OUT/seed-S
    result = tiny("segviz", out.parent, cache, "--device", "cuda", *amp)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "cuda" in result.stdout and len(metrics["dice"]["liver"]["cases"]) == 2
    again = run(
        "eval.py",
        "--checkpoint",
        str(out / "model.pt"),
        "--device",
        "cuda",
        "--out",
        str(tmp_path / "e"),
    )
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("both, second", [([], []), (["--norm", "batch"], ["--val-every", "1"])],
                         ids=["again", "with-validation"])
def test_same_seed_gives_bitwise_the_same_model(both, second, tmp_path, cache):
    # the default setup twice; and validating every round must leave training untouched,
    # batch-norm statistics included
    a, b = tmp_path / "a", tmp_path / "b"
    assert tiny("segviz", a, cache, "--seeds", "3", *both).returncode == 0
    assert tiny("segviz", b, cache, "--seeds", "3", *both, *second).returncode == 0
    sa = torch.load(a / "seed-3" / "model.pt", weights_only=True)["states"]
    sb = torch.load(b / "seed-3" / "model.pt", weights_only=True)["states"]
    for site in sa:
        for k in sa[site]:
            assert torch.equal(sa[site][k], sb[site][k]), (site, k)


def test_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint")
    result = run("eval.py", "--checkpoint", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# Real data: the public layouts built from the real CT, end to end at a tiny size
# ---------------------------------------------------------------------------------------


def needs_real_ct():
    sys.path.insert(0, os.path.join(ROOT, "tests", "realdata"))
    import layouts

    if layouts.MISSING:
        pytest.skip(layouts.MISSING)


@pytest.mark.slow
def test_real_data_end_to_end_with_predictions_on_the_original_grid(tmp_path):
    needs_real_ct()
    import nibabel as nib

    import layouts

    root = layouts.data_root(tmp_path / "data")
    out, cache, pred = tmp_path / "run" / "seed-0", tmp_path / "cache", tmp_path / "pred"
    result = run(
        "train.py",
        "--nodes",
        "4",
        "--mode",
        "segviz",
        "--data-root",
        str(root),
        "--rounds",
        "1",
        "--local-steps",
        "1",
        "--val-split",
        "0",
        "--spacing",
        "6",
        "6",
        "6",
        "--cache",
        str(cache),
        "--out",
        str(out.parent),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source"]["layouts"] == {"liver": "msd", "spleen": "msd", "pancreas": "msd",
                                                    "kidneys": "kits19", "test": "btcv"}
    assert len(metrics["dice"]["kidneys"]["cases"]) == 1
    # real data trains and tests with its own patch
    real_patch = list(REAL_DATA["phantom"]["patch"])
    assert (
        metrics["config"]["patch"] == metrics["config"]["roi"] == real_patch != list(Config().patch)
    )

    again = run("eval.py", "--checkpoint", str(out / "model.pt"), "--data-root", str(root),
                "--cache", str(cache), "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    ev = json.loads((tmp_path / "metrics.json").read_text())
    for organ in metrics["organs"]:
        assert ev["dice"][organ]["cases"] == pytest.approx(
            metrics["dice"][organ]["cases"], abs=1e-6
        )
    # the test set's scans segmented on their own grids, in BTCV's ids
    images = root / "Abdomen/RawData/Training/img"
    seg = run(
        "-m",
        "realdata",
        "predict",
        "-i",
        str(images),
        "-o",
        str(pred),
        "--checkpoint",
        str(out / "model.pt"),
    )
    assert seg.returncode == 0, seg.stderr[-2000:]
    image = nib.load(root / "Abdomen/RawData/Training/img/img0001.nii.gz")
    saved = nib.load(pred / "img0001.nii.gz")
    assert saved.shape == image.shape
    assert (saved.affine == image.affine).all()
    assert set(np.unique(np.asanyarray(saved.dataobj))) <= {0, 1, 2, 3, 6, 11}

    # one scan in, one label map out, on that scan's own grid (here the KiTS19 I,P,L copy)
    scan = root / "kits19/data/case_00000/imaging.nii.gz"
    one = run(
        "-m",
        "realdata",
        "predict",
        "-i",
        str(scan),
        "-o",
        str(tmp_path / "one"),
        "--checkpoint",
        str(out / "model.pt"),
    )
    assert one.returncode == 0, one.stderr[-2000:]
    seg = nib.load(tmp_path / "one" / "imaging.nii.gz")
    assert seg.shape == nib.load(scan).shape and (seg.affine == nib.load(scan).affine).all()


def test_real_data_bad_input_exits_2_and_writes_nothing(tmp_path):
    needs_real_ct()
    import layouts

    root = layouts.data_root(tmp_path / "data")
    scan = root / "Task09_Spleen/imagesTr/spleen_0.nii.gz"
    scan.write_bytes(scan.read_bytes()[:2000])  # truncated
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = run("train.py", "--nodes", "2", "--data-root", str(root), "--val-split", "0",
                 "--spacing", "6", "6", "6", "--cache", str(cache), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(scan) in lines[0] and "cannot be read as NIfTI" in lines[0]
    assert not out.exists()
    assert not [f for f in os.listdir(cache) if not f.endswith(".pt")], (
        "no temporary file left in the cache"
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("train.py", "--data-root", str(empty), "--out", str(out))
    assert result.returncode == 2 and "none of the expected datasets found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# Resume, dropout, refused updates, through the command line
# ---------------------------------------------------------------------------------------

# a variant with random state of its own (who is absent each round): python -m experiments train
RESUMABLE = (
    "-m",
    "experiments",
    "train",
    "--nodes",
    "2",
    "--mode",
    "segviz",
    "--rounds",
    "12",
    "--local-steps",
    "1",
    "--max-cases",
    "1",
    "--dropout",
    "0.5",
    "--device",
    "cpu",
    *SMALL,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run(*RESUMABLE, "--cache", str(cache), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "seed-0"


def wait_for_round(state_path, proc, n, timeout=300):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be interrupted")
        if state_path.exists():
            try:
                if torch.load(state_path, weights_only=True)["round"] >= n:
                    return
            except Exception:
                pass
        time.sleep(0.02)
    pytest.fail("the run did not reach the round in time")


def start(command: tuple, out) -> subprocess.Popen:
    """The command in the background, as a user would start it (a suite started with `cmd &`
    inherits an ignored SIGINT: the run gets the default back)."""
    import signal

    return subprocess.Popen([sys.executable, *command, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
@pytest.mark.parametrize("sig, again", [("SIGKILL", "--resume"), ("SIGINT", "the same command")])
def test_an_interrupted_run_resumes_to_bitwise_the_same_weights(
    sig, again, uninterrupted, tmp_path, cache
):
    import signal

    out = tmp_path / "run" / "seed-0"
    command = (*RESUMABLE, "--cache", str(cache))
    proc = start(command, out.parent)
    wait_for_round(out / "state.pt", proc, 1)  # the first round is always saved
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and "--resume" in err
    assert not (out / "model.pt").exists()
    state = torch.load(out / "state.pt", weights_only=True)
    stopped_at, earlier_seconds = state["round"], state["train_seconds"]
    assert 1 <= stopped_at < 12 and earlier_seconds > 0

    if again == "--resume":
        resumed = run("-m", "experiments", "train", "--resume", str(out))
    else:  # the command that was stopped, issued again: it finds the state and goes on from it
        resumed = run(*command, "--out", str(out.parent))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"after round {stopped_at}/12" in resumed.stdout
    a = torch.load(uninterrupted / "model.pt", weights_only=True)["states"]
    b = torch.load(out / "model.pt", weights_only=True)["states"]
    for site in a:
        for k in a[site]:
            assert torch.equal(a[site][k], b[site][k]), (site, k)
    ma = json.loads((uninterrupted / "metrics.json").read_text())
    mb = json.loads((out / "metrics.json").read_text())
    assert ma["losses"] == mb["losses"] and ma["events"] == mb["events"]
    # the resumed run's time includes the training done before the interruption
    assert ma["starts"] == 1 and mb["starts"] == 2 and mb["train_seconds"] > earlier_seconds
    assert "over 2 starts" in resumed.stdout
    # and its final state is the uninterrupted run's: every tensor and random state, the clock aside
    sa = torch.load(uninterrupted / "state.pt", weights_only=True)
    sb = torch.load(out / "state.pt", weights_only=True)
    assert_same(without_clock(sa), without_clock(sb))


def without_clock(state: dict) -> dict:
    return {k: v for k, v in state.items() if k not in ("train_seconds", "starts")}


def assert_same(a, b, where="state"):
    """Equal nested containers of tensors and plain values, tensors bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_dropout_runs_to_the_end_and_logs_every_absence(uninterrupted):
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    absences = [e for e in metrics["events"] if "absent" in e]
    assert absences, "at P = 0.5 over 12 rounds of 2 clients some client is absent"
    for site in ("liver", "spleen"):
        missed = sum(site in e for e in absences)
        assert len(metrics["losses"][site]) == 12 - missed, (
            "an absent client has no loss that round"
        )


@pytest.mark.slow
def test_resume_refuses_other_settings_and_broken_states(uninterrupted, tmp_path):
    for flag, value in [
        ("--mode", "fedavg"),
        ("--nodes", "3"),
        ("--preset", "paper"),
        ("--task-stages", "2"),
    ]:
        result = run("-m", "experiments", "train", "--resume", str(uninterrupted), flag, value)
        assert result.returncode == 2 and f"{flag} cannot be given" in result.stderr, (
            flag,
            result.stderr,
        )
    result = run("-m", "experiments", "train", "--resume", str(uninterrupted), "--dropout", "0.1")
    assert result.returncode == 2 and "--dropout cannot be given" in result.stderr
    # train.py does not know the variant's functions: it points to python -m experiments train
    result = run("train.py", "--resume", str(uninterrupted))
    assert result.returncode == 2 and "python -m experiments train --resume" in result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    state = (uninterrupted / "state.pt").read_bytes()
    (broken / "state.pt").write_bytes(state[: len(state) // 3])
    result = run("train.py", "--resume", str(broken))
    assert result.returncode == 2
    assert (
        len(result.stderr.strip().splitlines()) == 1 and "state.pt: cannot be read" in result.stderr
    )
    result = run("train.py", "--resume", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "nothing to resume" in result.stderr
    # a state of another version (another format) is not continued
    other = tmp_path / "other"
    other.mkdir()
    blob = torch.load(uninterrupted / "state.pt", weights_only=True)
    torch.save({**blob, "format": "segviz-state/3"}, other / "state.pt")
    result = run("-m", "experiments", "train", "--resume", str(other))
    assert (
        result.returncode == 2 and "not a training state written by this version" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1


def files_of(folder) -> dict:
    """Every file under a folder with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten_without_asking(uninterrupted, tmp_path, cache):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out / "seed-0")
    before = files_of(out)
    command = (*RESUMABLE, "--cache", str(cache), "--out", str(out))
    # the same command again: every seed it asks for has finished
    again = run(*command)
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, again.stderr
    assert "holds a finished run of every seed" in lines[0] and "--overwrite" in lines[0]
    # other settings into the same folder
    other = run(*command, "--rounds", "13")
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1, other.stderr
    assert "holds a run of other settings (rounds)" in lines[0]
    assert files_of(out) == before, "a refused command touches nothing"
    # asked to, it trains the seed again, from scratch, to the same weights
    over = run(*command, "--overwrite")
    assert over.returncode == 0, over.stderr[-2000:]
    metrics = json.loads((out / "seed-0" / "metrics.json").read_text())
    assert metrics["starts"] == 1
    a = torch.load(uninterrupted / "model.pt", weights_only=True)["states"]
    b = torch.load(out / "seed-0" / "model.pt", weights_only=True)["states"]
    assert all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])


@pytest.mark.slow
def test_several_seeds_stopped_in_the_second_go_on_without_training_the_first_again(
    tmp_path, cache
):
    import signal

    out = tmp_path / "run"
    command = (*RESUMABLE, "--rounds", "6", "--seeds", "0", "1", "2", "--cache", str(cache))
    proc = start(command, out)
    wait_for_round(out / "seed-1" / "state.pt", proc, 1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert not (out / "seed-1" / "model.pt").exists() and not (out / "seed-2").exists()
    first = files_of(out / "seed-0")
    again = run(*command, "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"seed 0: finished in {out / 'seed-0'}, kept" in again.stdout
    assert files_of(out / "seed-0") == first, "the finished seed is not trained again"
    starts = {s: json.loads((out / f"seed-{s}" / "metrics.json").read_text())["starts"]
              for s in (1, 2)}
    assert starts == {1: 2, 2: 1}, "seed 1 resumed from its state, seed 2 trained afresh"
    assert "mean of 3 seeds" in again.stdout


# ---------------------------------------------------------------------------------------
# The stronger baselines and the paper's table in two commands
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_paper_preset_runs_end_to_end(tmp_path, cache):
    # the original's recipe at a tiny size: one round, one step, one epoch of head fine-tuning
    out = tmp_path / "paper" / "seed-0"
    result = tiny(
        "segviz",
        out.parent,
        cache,
        "--preset",
        "paper",
        "--rounds",
        "1",
        "--finetune-epochs",
        "1",
        "--max-cases",
        "1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    cfg, ckpt = metrics["config"], torch.load(out / "model.pt", weights_only=True)
    assert (cfg["loss"], cfg["norm"], cfg["channels"]) == ("dice", "batch", [16, 32, 64, 128, 256])
    assert (cfg["roi"], cfg["blend"], cfg["largest"], ckpt["shared_rep"]) == (
        [160, 160, 160],
        "constant",
        False,
        False,
    )
    assert any("kept the model of round 1" in e for e in metrics["events"])
    assert sum("fine-tuned" in e for e in metrics["events"]) == 2
    states = torch.load(out / "model.pt", weights_only=True)["states"]
    liver, spleen = states["liver"], states["spleen"]
    # parameters of the representation were averaged (and frozen while the heads fine-tuned);
    # BatchNorm statistics are buffers: they stayed local, as in the original
    params = [
        k
        for k in liver
        if k.startswith("rep.")
        and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    assert params and all(torch.equal(liver[k], spleen[k]) for k in params)
    stat = "rep.down.0.units.0.norm.running_mean"
    assert not torch.equal(liver[stat], spleen[stat])
    assert not torch.equal(liver["task.up.0.up.conv.weight"], spleen["task.up.0.up.conv.weight"])


@pytest.mark.slow
def test_head_fine_tuning_keeps_one_shared_representation_with_batchnorm(tmp_path, cache):
    # the phantom preset shares normalisation statistics: fine-tuning a head (in training mode,
    # so BatchNorm's running statistics move) must leave every site the same representation
    out = tmp_path / "ft" / "seed-0"  # each seed's run is in OUT/seed-S
    result = tiny("segviz", out.parent, cache, "--norm", "batch", "--finetune-epochs", "1",
                  "--max-cases", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["shared_rep"]
    liver, spleen = ckpt["states"]["liver"], ckpt["states"]["spleen"]
    rep = [k for k in liver if k.startswith("rep.")]
    assert "rep.down.0.units.0.norm.running_mean" in rep and all(
        torch.equal(liver[k], spleen[k]) for k in rep
    )
    assert not torch.equal(liver["task.up.0.up.conv.weight"], spleen["task.up.0.up.conv.weight"])


def test_the_state_is_saved_after_the_first_and_last_round_and_spaced_by_its_cost(
    tmp_path, monkeypatch
):
    # a fake clock: a round takes 1 s, a save 0.125 s; with SAVE_SPACING 50 the state is written
    # again once 6.25 s of training have passed since the last save
    cases = {
        s: [
            Case(
                f"{s}-0",
                torch.rand(48, 48, 32),
                (torch.rand(48, 48, 32) > 0.9).to(torch.uint8),
                (3.0,) * 3,
            )
        ]
        for s in ("liver", "spleen")
    }
    run = train.build_run(
        resolve({"nodes": 2, "rounds": 16, "out": str(tmp_path)}), cases, train.Extensions()
    )
    clock, saved = [0.0], []

    class FakeTime:
        @staticmethod
        def monotonic():
            return clock[0]

        time = monotonic

    def fake_round(*args, **kwargs):
        clock[0] += 1.0
        return fl.RoundReport({"liver": 0.5, "spleen": 0.5}, [], {}, {})

    def fake_save(run, rounds_done):
        clock[0] += 0.125
        saved.append(rounds_done)

    monkeypatch.setattr(train, "SAVE_SPACING", 50)
    monkeypatch.setattr(train, "time", FakeTime)
    monkeypatch.setattr(fl, "federated_round", fake_round)
    monkeypatch.setattr(train, "save_state", fake_save)
    train.rounds_loop(run, {}, 0)
    assert saved == [1, 8, 15, 16]


@pytest.mark.slow
def test_the_seed_sets_the_initial_weights(tmp_path, cache, monkeypatch):
    # the weights a run starts from: equal under one seed, different under another (train()
    # seeds torch before it builds the model, whatever else it draws first)
    class Started(Exception):
        pass

    def first_state(run, val_cases, start):
        raise Started({k: v.clone() for k, v in run.clients[0].model_state.items()})

    monkeypatch.setattr(train, "rounds_loop", first_state)
    states = []
    for seed in (0, 0, 1):
        cfg = resolve(
            {
                "nodes": 2,
                "seed": seed,
                "max_cases": 1,
                "spacing": (6.0, 6.0, 6.0),
                "cache": str(cache),
                "out": str(tmp_path / f"seed-{seed}"),
            }
        )
        with pytest.raises(Started) as stopped:
            train.train(cfg)
        states.append(stopped.value.args[0])
    a, b, c = states
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("amp, dtype", [(False, None), (True, torch.bfloat16)])
def test_amp_reaches_every_client_of_the_run(amp, dtype, tmp_path):
    cases = {s: [Case(f"{s}-0", torch.rand(48, 48, 32),
                      (torch.rand(48, 48, 32) > 0.9).to(torch.uint8), (3.0,) * 3)]
             for s in ("liver", "spleen")}
    for mode in ("segviz", "central"):
        cfg = resolve({"nodes": 2, "mode": mode, "amp": amp, "device": "cpu",
                       "out": str(tmp_path)})
        run = train.build_run(cfg, cases, train.Extensions())
        assert [c.amp for c in run.clients] == [dtype] * len(run.clients)
        assert all(c.scaler is None for c in run.clients)  # bfloat16 needs no scaling


def test_a_float16_sites_gradient_scale_is_saved_and_restored(tmp_path):
    cases = {s: [Case(f"{s}-0", torch.rand(48, 48, 32),
                      (torch.rand(48, 48, 32) > 0.9).to(torch.uint8), (3.0,) * 3)]
             for s in ("liver", "spleen")}
    cfg = resolve({"nodes": 2, "amp": True, "device": "cpu", "out": str(tmp_path)})

    def float16_run():  # as on a CUDA GPU without bfloat16
        run = train.build_run(cfg, cases, train.Extensions())
        for c in run.clients:
            c.amp, c.scaler = torch.float16, torch.amp.GradScaler("cpu")
        return run

    run = float16_run()
    fl.local_train(run.model, run.optimizer, run.clients[0], 2)
    trained = run.clients[0].scaler.state_dict()
    assert trained != run.clients[1].scaler.state_dict()  # the steps moved the liver's scaler
    train.save_state(run, 1)
    again = float16_run()
    train.restore_state(again, str(tmp_path / "state.pt"))
    assert [c.scaler.state_dict() for c in again.clients] == [
        c.scaler.state_dict() for c in run.clients]


# ---------------------------------------------------------------------------------------
# Which seeds a command trains, keeps or resumes; what it refuses
# ---------------------------------------------------------------------------------------


def test_overwrite_removes_the_old_run_before_training_afresh(tmp_path, monkeypatch, capsys):
    cfg = resolve({"out": str(tmp_path)})
    finished_run(tmp_path / "seed-0", replace(cfg, seed=0), evaluated=True)
    (tmp_path / "seed-0" / "state.pt").write_bytes(b"an old state")

    def stopped_at_once(seed_cfg, ext, resume):
        raise KeyboardInterrupt  # Ctrl-C before the first round ends

    monkeypatch.setattr(train, "train", stopped_at_once)
    assert train.train_seeds(cfg, [0], overwrite=True) == 130
    assert not list((tmp_path / "seed-0").iterdir()), "no old model, state or test scores left"
    assert "nothing to resume" in capsys.readouterr().err


def test_the_hint_after_ctrl_c_never_repeats_overwrite(tmp_path, monkeypatch, capsys):
    cfg = resolve({"out": str(tmp_path / "seed-0")})
    (tmp_path / "seed-0").mkdir()
    (tmp_path / "seed-0" / "state.pt").write_bytes(b"a state")

    def stopped(seed_cfg, ext, resume):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", stopped)
    assert train.run_or_stop(cfg, train.Extensions(), False, "python train.py", True) == 130
    assert "issue the same command again without --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "0"], "--seeds 0 0: a seed given twice"),
    (["--resume", "x", "--overwrite"], "not allowed with argument"),
])
def test_contradictory_flags_are_refused(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, error
    assert not (tmp_path / "run").exists()
