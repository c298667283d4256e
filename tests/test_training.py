"""A training run end to end at a tiny size through train.py and experiments.py train: its
outputs, resume, and its answers to bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import fl
import training
from config import PRESETS, Config, resolve
from data import Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


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
    assert float(training.dice_loss(perfect, target)) < 1e-4
    assert float(training.dice_loss(-perfect, target)) > 0.99


def test_round_robin_draws_from_each_site_in_turn():
    class Fake:
        def __init__(self, name):
            self.name = name

        def sample(self):
            return self.name

    nxt = data.round_robin([Fake("a"), Fake("b"), Fake("c")])
    assert [nxt() for _ in range(5)] == ["a", "b", "c", "a", "b"]


def test_binary_sampler_labels_and_multiclass_labels():
    label = torch.zeros(20, 20, 20, dtype=torch.uint8)
    label[5:10, 5:10, 5:10] = 3
    case = Case("c", torch.full((20, 20, 20), 100.0), label, (3.0, 3.0, 3.0))
    cfg = data.SamplerConfig(patch=(8, 8, 8), volumes_per_batch=1, patches_per_volume=4, augment=False)
    _, y = data.site_sampler([case], (-100, 200), True, cfg, "cpu", 0).sample()
    assert set(y.unique().tolist()) <= {0, 1} and (y == 1).any()
    _, y = data.site_sampler([case], (-100, 200), False, cfg, "cpu", 0).sample()
    assert set(y.unique().tolist()) <= {0, 3} and (y == 3).any()


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

    real = training.site_sampler
    monkeypatch.setattr(training, "site_sampler", recording)
    cases = {s: [Case(f"{s}-0", torch.zeros(48, 48, 32), torch.zeros(48, 48, 32, dtype=torch.uint8), (3.0,) * 3)]
             for s in ORIGINAL_WINDOWS}
    training.build_run(resolve(Config(mode=mode, out=str(tmp_path))), cases, training.Extensions())
    expected = ORIGINAL_WINDOWS if mode in ("segviz", "single") else dict.fromkeys(ORIGINAL_WINDOWS, ORIGINAL_POOLED)
    assert seen == expected


def test_a_saved_state_restores_validation_the_best_model_and_the_pooled_position(tmp_path):
    # what only some runs use (validation curves, keep="best", the central model's round-robin)
    # must come back from state.pt too
    cases = {s: [Case(f"{s}-{i}", torch.rand(48, 48, 32), (torch.rand(48, 48, 32) > 0.9).to(torch.uint8), (3.0,) * 3)
                 for i in range(2)] for s in ("liver", "spleen")}
    cfg = resolve(Config(nodes=2, mode="central", out=str(tmp_path)))
    run = training.build_run(cfg, cases, training.Extensions())
    fl.local_train(run.model, run.optimizer, run.clients[0], 2)  # moves the weights and the pooled position
    run.validation = [{"round": 4, "liver": 0.5, "spleen": 0.25}]
    run.best = {"round": 4, "score": 0.375, "states": {"pooled": dict(run.clients[0].model_state)}}
    run.log, run.norms = ["round 3: absent: spleen"], [{"pooled": 1.5}]
    position = run.pooled.position[0]
    assert position != 0
    training.save_state(run, 5)

    fresh = training.build_run(cfg, cases, training.Extensions())
    assert training.restore_state(fresh, str(tmp_path / training.STATE_FILE)) == 5
    assert fresh.pooled.position[0] == position
    assert (fresh.validation, fresh.log, fresh.norms) == (run.validation, run.log, run.norms)
    assert fresh.best["round"] == 4 and fresh.best["score"] == 0.375
    assert all(torch.equal(fresh.best["states"]["pooled"][k], v) for k, v in run.best["states"]["pooled"].items())
    assert all(torch.equal(fresh.clients[0].model_state[k], v) for k, v in run.clients[0].model_state.items())
    assert torch.equal(fresh.samplers["liver"].gen.get_state(), run.samplers["liver"].gen.get_state())


VARIANTS = ("--marginal", "--oracle", "--dropout", "--aggregate", "--weighted")
# the phantom at 6 mm: a run end to end on an eighth of the default's voxels (its patches and
# windows are mostly padding there; sampling and blending have tests of their own)
SMALL = ("--spacing", "6", "6", "6")


def tiny(mode, out, cache, *extra):
    script = ("experiments.py", "train") if any(a in VARIANTS for a in extra) else ("train.py",)
    return run(*script, "--nodes", "2", "--mode", mode, "--rounds", "2", "--local-steps", "1",
               "--max-cases", "2", "--out", str(out), "--cache", str(cache), *SMALL, *extra)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("mode, extra, name", [
    ("segviz", [], "segviz-2"), ("single", [], "single-2"), ("central", [], "central-2"), ("fedavg", [], "fedavg-2"),
    ("segviz", ["--fedbn"], "segviz-fedbn-2"), ("central", ["--marginal"], "central-marginal-2"),
    ("fedavg", ["--marginal"], "fedavg-marginal-2"), ("central", ["--oracle"], "oracle-2")])
def test_every_mode_trains_evaluates_and_reloads(mode, extra, name, tmp_path, cache):
    out = tmp_path / "run"
    result = tiny(mode, out, cache, *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == mode and metrics["nodes"] == 2 and metrics["name"] == name
    assert metrics["organs"] == ["liver", "spleen"]
    for organ in metrics["organs"]:
        d = metrics["dice"][organ]
        assert 0.0 <= d["mean"] <= 1.0 and len(d["cases"]) == 2
    assert "liver" in result.stdout and "±" in result.stdout
    # at test time each head sees its own site's window; a multi-class model the pooled one
    import eval as ev

    model = ev.model_from_checkpoint(ev.load_checkpoint(str(out / "model.pt")))
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
        assert re_metrics["dice"][organ]["cases"] == pytest.approx(metrics["dice"][organ]["cases"], abs=1e-6)


def test_channels_reach_the_trained_model_and_its_checkpoint(tmp_path, cache):
    out = tmp_path / "run"
    result = tiny("segviz", out, cache, "--channels", "4,8,16,32,64")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["config"]["unet"]["channels"] == [4, 8, 16, 32, 64]
    widths = {v.shape[0] for k, v in ckpt["states"]["liver"].items() if k.startswith("rep.") and k.endswith(".weight")
              and v.dim() == 5}
    assert {4, 8, 16, 32, 64} <= widths
    again = run("eval.py", "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_trains_evaluates_and_reloads_on_the_gpu(tmp_path, cache):
    out = tmp_path / "run"
    result = tiny("segviz", out, cache, "--device", "cuda")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "cuda" in result.stdout and len(metrics["dice"]["liver"]["cases"]) == 2
    again = run("eval.py", "--checkpoint", str(out / "model.pt"), "--device", "cuda", "--out", str(tmp_path / "e"))
    assert again.returncode == 0, again.stderr[-2000:]


@pytest.mark.parametrize("both, second", [([], []), (["--norm", "batch"], ["--val-every", "1"])],
                         ids=["again", "with-validation"])
def test_same_seed_gives_bitwise_the_same_model(both, second, tmp_path, cache):
    # the default setup twice; and validating every round must leave training untouched,
    # batch-norm statistics included
    a, b = tmp_path / "a", tmp_path / "b"
    assert tiny("segviz", a, cache, "--seeds", "3", *both).returncode == 0
    assert tiny("segviz", b, cache, "--seeds", "3", *both, *second).returncode == 0
    sa = torch.load(a / "model.pt", weights_only=True)["states"]
    sb = torch.load(b / "model.pt", weights_only=True)["states"]
    for site in sa:
        for k in sa[site]:
            assert torch.equal(sa[site][k], sb[site][k]), (site, k)


def test_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x02not a checkpoint")
    result = run("eval.py", "--checkpoint", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_table_gathers_finished_runs(tmp_path, cache):
    runs = tmp_path / "runs"
    assert tiny("central", runs / "central", cache).returncode == 0
    assert tiny("segviz", runs / "segviz", cache).returncode == 0
    (runs / "unfinished").mkdir()  # a run without metrics.json is left out
    result = run("experiments.py", "table", str(runs))
    assert result.returncode == 0, result.stderr
    for name in ("central", "segviz"):
        dice = json.loads((runs / name / "metrics.json").read_text())["dice"]["liver"]
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {name}-2 "))
        assert f"{dice['mean']:.3f} ± {dice['std']:.3f}" in row
    assert run("experiments.py", "table", str(tmp_path / "none")).returncode == 2


# ---------------------------------------------------------------------------------------
# Real data: the public layouts built from the real CT, end to end at a tiny size
# ---------------------------------------------------------------------------------------


def needs_real_ct():
    import layouts

    if layouts.MISSING:
        pytest.skip(layouts.MISSING)


def test_real_data_end_to_end_with_predictions_on_the_original_grid(tmp_path):
    needs_real_ct()
    import nibabel as nib

    import layouts

    root = layouts.data_root(tmp_path / "data")
    out, cache, pred = tmp_path / "run", tmp_path / "cache", tmp_path / "pred"
    result = run("train.py", "--nodes", "4", "--mode", "segviz", "--data-root", str(root), "--rounds", "1",
                 "--local-steps", "1", "--val-split", "0", "--spacing", "6", "6", "6",
                 "--cache", str(cache), "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["source"]["layouts"] == {"liver": "msd", "spleen": "msd", "pancreas": "msd",
                                                    "kidneys": "kits19", "test": "btcv"}
    assert len(metrics["dice"]["kidneys"]["cases"]) == 1
    real_patch = list(PRESETS["phantom"].real["patch"])  # real data trains and tests with its own patch
    assert metrics["config"]["patch"] == metrics["config"]["roi"] == real_patch != list(PRESETS["phantom"].patch)

    again = run("eval.py", "--checkpoint", str(out / "model.pt"), "--data-root", str(root), "--save-pred",
                str(pred), "--cache", str(cache), "--workers", "1", "--out", str(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    ev = json.loads((tmp_path / "metrics.json").read_text())
    for organ in metrics["organs"]:
        assert ev["dice"][organ]["cases"] == pytest.approx(metrics["dice"][organ]["cases"], abs=1e-6)
    image = nib.load(root / "Abdomen/RawData/Training/img/img0001.nii.gz")
    saved = nib.load(pred / "img0001.nii.gz")
    assert saved.shape == image.shape
    assert (saved.affine == image.affine).all()
    assert set(np.unique(np.asanyarray(saved.dataobj))) <= {0, 1, 2, 3, 6, 11}

    # one scan in, one label map out, on that scan's own grid (here the KiTS19 I,P,L copy)
    scan = root / "kits19/data/case_00000/imaging.nii.gz"
    one = run("eval.py", "predict", "-i", str(scan), "-o", str(tmp_path / "one"), "--checkpoint",
              str(out / "model.pt"))
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
    assert not [f for f in os.listdir(cache) if not f.endswith(".pt")], "no temporary file left in the cache"

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("train.py", "--data-root", str(empty), "--out", str(out))
    assert result.returncode == 2 and "none of the expected datasets found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# Resume, dropout, refused updates, through the command line
# ---------------------------------------------------------------------------------------

# a variant with random state of its own (who is absent each round): experiments.py train
RESUMABLE = ("experiments.py", "train", "--nodes", "2", "--mode", "segviz", "--rounds", "12", "--local-steps", "1",
             "--max-cases", "1", "--dropout", "0.5", "--device", "cpu", *SMALL)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run(*RESUMABLE, "--cache", str(cache), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


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


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_an_interrupted_run_resumes_to_bitwise_the_same_weights(sig, uninterrupted, tmp_path, cache):
    import signal

    out = tmp_path / "run"
    # a suite started in the background (`cmd &`) inherits an ignored SIGINT; give the run the default back
    proc = subprocess.Popen([sys.executable, *RESUMABLE, "--cache", str(cache), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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

    resumed = run("experiments.py", "train", "--resume", str(out))
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


def test_dropout_runs_to_the_end_and_logs_every_absence(uninterrupted):
    metrics = json.loads((uninterrupted / "metrics.json").read_text())
    absences = [e for e in metrics["events"] if "absent" in e]
    assert absences, "at P = 0.5 over 12 rounds of 2 clients some client is absent"
    for site in ("liver", "spleen"):
        missed = sum(site in e for e in absences)
        assert len(metrics["losses"][site]) == 12 - missed, "an absent client has no loss that round"


def test_resume_refuses_other_settings_and_broken_states(uninterrupted, tmp_path):
    for flag, value in [("--mode", "fedavg"), ("--nodes", "3"), ("--preset", "paper"), ("--task-stages", "2")]:
        result = run("experiments.py", "train", "--resume", str(uninterrupted), flag, value)
        assert result.returncode == 2 and f"{flag} cannot be given" in result.stderr, (flag, result.stderr)
    # train.py does not know the variant's functions: it points to experiments.py
    result = run("train.py", "--resume", str(uninterrupted))
    assert result.returncode == 2 and "python experiments.py train --resume" in result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    state = (uninterrupted / "state.pt").read_bytes()
    (broken / "state.pt").write_bytes(state[: len(state) // 3])
    result = run("train.py", "--resume", str(broken))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "state.pt: cannot be read" in result.stderr
    result = run("train.py", "--resume", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "nothing to resume" in result.stderr
    # a state trained with other patches or augmentation (another version's real-data recipe) is
    # not continued; nor one from before the recipe was recorded whose patch differs
    other = tmp_path / "other"
    other.mkdir()
    blob = torch.load(uninterrupted / "state.pt", weights_only=True)
    assert blob["recipe"] == training.recipe(PRESETS["phantom"])
    for changed in ({"recipe": {**blob["recipe"], "p_affine": 1.0}},
                    {"recipe": None, "patch": [32, 32, 32]}):
        torch.save({**blob, **changed}, other / "state.pt")
        result = run("experiments.py", "train", "--resume", str(other))
        assert result.returncode == 2 and "trained with {'patch'" in result.stderr, result.stderr[-500:]
        assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------
# The stronger baselines and the paper's table in two commands
# ---------------------------------------------------------------------------------------


def test_marginal_loss_is_dice_ce_when_every_organ_is_labelled():
    from variants import marginal_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 6, 4)
    target = torch.randint(0, 5, (2, 6, 6, 4))
    torch.testing.assert_close(marginal_loss(logits, target, [1, 2, 3, 4]), training.dice_ce_loss(logits, target))


def test_marginal_loss_never_teaches_an_unlabelled_organ_as_background():
    from variants import marginal_loss

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6, 6, 4, requires_grad=True)
    target = torch.randint(0, 2, (2, 6, 6, 4))  # a liver site: background 0 and liver 1 only
    loss = marginal_loss(logits, target, [1])
    loss.backward()
    g, p = logits.grad, torch.softmax(logits.detach(), 1)
    # within the merged group {background, spleen, pancreas, kidneys} the gradient only moves
    # the group's total: each member's gradient is proportional to its probability
    for organ in (2, 3, 4):
        torch.testing.assert_close(g[:, organ] * p[:, 0], g[:, 0] * p[:, organ], atol=1e-9, rtol=1e-5)
    # so swapping an unlabelled organ's logit with background's leaves the loss unchanged...
    swapped = logits.detach().clone()
    swapped[:, [0, 2]] = swapped[:, [2, 0]]
    torch.testing.assert_close(marginal_loss(swapped, target, [1]), loss.detach())
    # ...which the ordinary loss, teaching the spleen as background, does not
    assert not torch.allclose(training.dice_ce_loss(swapped, target), training.dice_ce_loss(logits.detach(), target))


def test_wilcoxon_marks_on_known_inputs():
    from experiments import significance

    a = [0.9] * 8
    b = [0.9 - 0.01 * (i + 1) for i in range(8)]  # eight paired differences, all positive
    p, mark = significance(a, b)
    assert p == pytest.approx(2 / 256) and mark == "**"
    p, mark = significance(a[:6], b[:6])
    assert p == pytest.approx(2 / 64) and mark == "*"
    p, mark = significance([0.5, 0.6, 0.7, 0.8], [0.6, 0.5, 0.8, 0.7])
    assert mark == "ns" and p > 0.5
    assert significance(a, a) == (1.0, "ns")


def test_the_suite_runs_every_setup_skips_finished_ones_and_compares(tmp_path, cache):
    out = tmp_path / "paper"
    args = ("experiments.py", "suite", "--nodes", "2", "--seeds", "0", "--out", str(out), "--rounds", "2",
            "--local-steps", "1", "--max-cases", "1", "--val-every", "1", "--cache", str(cache), *SMALL)
    first = run(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    names = {"single-2", "central-2", "central-marginal-2", "fedavg-2", "fedavg-marginal-2", "segviz-2",
             "segviz-fedbn-2", "oracle-2"}
    assert {p.name for p in out.iterdir() if p.is_dir()} == names
    assert all((out / n / "metrics.json").exists() for n in names)
    results = json.loads((out / "results.json").read_text())
    # binary models are also read the other way: "segviz-2 (heads)", "single-2 (merged)"
    assert {row.split(" ")[0] for row in results} == names
    assert {"segviz-2 (heads)", "segviz-fedbn-2 (heads)", "single-2 (merged)"} <= set(results)
    assert "hd95" in results["segviz-2"]["liver"] and "nsd" in results["central-2"]["spleen"]
    assert "mark" in results["fedavg-2"]["liver"] and "mark" not in results["segviz-2"]["liver"]
    md = (out / "results.md").read_text()
    assert "| oracle-2 |" in md and "Wilcoxon" in md and "HD95 in mm" in md and "NSD at 2 mm" in md
    # an unfinished run is resumed and finished ones skipped when the command is issued again
    (out / "central-2" / "metrics.json").unlink()
    (out / "central-2" / "model.pt").unlink()
    again = run(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished, skipped") == 7 and "central-2 seed 0: resuming" in again.stdout
    assert (out / "central-2" / "metrics.json").exists()
    compare = run("experiments.py", "compare", str(out), "--figures")
    assert compare.returncode == 0 and "segviz-fedbn-2" in compare.stdout, compare.stderr[-2000:]
    figures = sorted(p.name for p in (out / "figures").iterdir())
    curves = [f"validation_{n}.png" for n in sorted(names)]
    assert figures == sorted(["dice_boxplot.png", "overlay_test_000.png", *curves])
    segviz_val = json.loads((out / "segviz-2" / "metrics.json").read_text())["validation"]
    assert [r["round"] for r in segviz_val] == [1, 2] and set(segviz_val[0]) == {"round", "liver", "spleen"}
    assert all(0 <= r[s] <= 1 for r in segviz_val for s in ("liver", "spleen"))
    assert all((out / "figures" / f).stat().st_size > 10_000 for f in figures)


def parse_train(argv):
    import argparse

    from config import add_config_arguments, config_of
    from variants import add_variant_arguments

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    add_variant_arguments(p)
    return config_of(p.parse_args(argv), p)


def test_a_variant_run_never_takes_a_plain_runs_folder(monkeypatch, tmp_path):
    import variants

    monkeypatch.chdir(tmp_path)  # the default out folders are checked for writability here

    made = {}
    monkeypatch.setattr(variants, "train_seeds", lambda cfg, seeds, **kw: made.setdefault("cfg", cfg) and 0)
    variants.main(["--mode", "segviz", "--dropout", "0.2", "--aggregate", "median"])
    assert made["cfg"].out == os.path.join("runs", "segviz-dropout0.2-median-4")
    names = {}
    for argv in (["--mode", "fedavg", "--marginal"], ["--mode", "central", "--oracle"], ["--weighted", "--fedbn"],
                 ["--dp-clip", "1", "--dp-noise", "0.01"], []):
        made.clear()
        variants.main(argv)
        names[made["cfg"].out] = argv
    assert sorted(names) == sorted(os.path.join("runs", n) for n in (
        "fedavg-marginal-4", "oracle-4", "segviz-weighted-fedbn-4", "segviz-dpclip1.0-dpnoise0.01-4", "segviz-4"))


def test_the_suite_passes_other_flags_through_and_each_setup_keeps_its_own(tmp_path):
    from experiments import script_of, suite_plan

    plan = suite_plan(str(tmp_path), [2, 3], [0, 1], ["--loss", "dice", "--rounds", "1"], real=False)
    assert len(plan) == 2 * 8 * 2  # node counts x setups x seeds
    _, folder, argv = next(p for p in plan if p[0] == "fedavg-marginal-2" and p[1].endswith("seed-1"))
    assert folder == str(tmp_path / "fedavg-marginal-2" / "seed-1")
    assert script_of(argv)[-1] == "train" and "--marginal" in argv  # a variant: experiments.py train
    marginal = parse_train(argv)
    assert marginal.loss == "dice" and marginal.rounds == 1 and marginal.out == folder
    plain = next(p[2] for p in plan if p[0] == "central-3")
    assert script_of(plain)[-1].endswith("train.py") and parse_train(plain).nodes == 3
    # real data has no oracle; one seed writes DIR/<setup> directly
    real = suite_plan(str(tmp_path), [4], [0], [], real=True)
    assert [p[0] for p in real] == ["single-4", "central-4", "central-marginal-4", "fedavg-4", "fedavg-marginal-4",
                                    "segviz-4", "segviz-fedbn-4"]
    assert real[0][1] == str(tmp_path / "single-4")


def test_eval_options_rescores_the_validation_that_training_reported(tmp_path, cache):
    # eval-options rebuilds each site's model from model.pt and its validation cases from the
    # saved config; under the preset's own options it must give training's validation Dice
    from experiments import eval_options_table, validation_table

    cand = tmp_path / "cand"
    result = run("train.py", "--nodes", "2", "--rounds", "6", "--local-steps", "2", "--max-cases", "2", "--val-every",
                 "6", "--no-test", "--seeds", "0", "1", "--out", str(cand), "--cache", str(cache), *SMALL)
    assert result.returncode == 0, result.stderr[-2000:]
    validation = [json.loads((cand / f"seed-{s}" / "metrics.json").read_text())["validation"][-1] for s in (0, 1)]
    assert all(v["liver"] > 0.05 for v in validation)  # something was learnt: equal numbers mean something
    trained = validation_table([str(cand)]).splitlines()[-1].split(" | ")[-1].strip(" |")
    table = eval_options_table([str(cand)])
    rows = {tuple(r[1:3]): r[-1] for r in option_rows(table)}
    assert rows[("gaussian", "largest")] == trained  # the preset's Gaussian blending with the clean-up
    assert rows[("constant", "largest")] != trained  # constant blending scores the same models differently
    # --cases draws the phantom's validation cases afresh: as many as training's are training's own
    assert eval_options_table([str(cand)], 2) == table
    assert option_rows(eval_options_table([str(cand)], 3)) != option_rows(table)


def option_rows(table: str) -> list[list[str]]:
    """The rows of an eval-options table, cells stripped (candidate, blending, clean-up, sites..., mean)."""
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]



def test_eval_options_on_real_data_reads_the_held_out_cases_again(tmp_path):
    # real data: eval-options finds the validation cases in the folders the run trained on,
    # the same ones (by name) the run held out, and re-scores training's validation Dice
    import synth_archives

    from experiments import eval_options_table, validation_table

    root, cand = tmp_path / "archives", tmp_path / "cand"
    synth_archives.generate(str(root), cases=3, test_cases=1, seed=0, coarsen=3.0, log=lambda s: None)
    result = run("train.py", "--nodes", "2", "--data-root", str(root), "--rounds", "4", "--local-steps", "2",
                 "--spacing", "6", "6", "6", "--val-every", "4", "--no-test", "--seeds", "0",
                 "--cache", str(tmp_path / "cache"), "--out", str(cand / "seed-0"), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    trained = validation_table([str(cand)]).splitlines()[-1].split(" | ")[-1].strip(" |")
    cfg = torch.load(cand / "seed-0" / "model.pt", weights_only=False)["config"]
    used = (cfg["blend"], "largest" if cfg["largest"] else "none")  # the real-data recipe's test-time options
    assert {tuple(r[1:3]): r[-1] for r in option_rows(eval_options_table([str(cand)]))}[used] == trained
    more = run("experiments.py", "eval-options", str(cand), "--cases", "4")  # real data: the split is the split
    assert more.returncode == 2 and len(more.stderr.strip().splitlines()) == 1, more.stderr
    assert "--cases" in more.stderr and "held-out split" in more.stderr

    # a run whose held-out cases are not the ones the folders give now is refused, in one line
    ckpt_path = cand / "seed-0" / "model.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    held = ckpt["config"]["source"]["validation"]["spleen"]
    ckpt["config"]["source"]["validation"]["spleen"] = ["spleen_other"]
    torch.save(ckpt, ckpt_path)
    moved = run("experiments.py", "eval-options", str(cand))
    assert moved.returncode == 2 and len(moved.stderr.strip().splitlines()) == 1, moved.stderr
    assert "no longer hold the validation cases" in moved.stderr
    # and so is a validation case that is gone, named
    (root / "Task09_Spleen" / "imagesTr" / f"{held[0]}.nii.gz").unlink()
    gone = run("experiments.py", "eval-options", str(cand))
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    assert gone.stderr.startswith("error: eval-options:") and f"{held[0]}.nii.gz" in gone.stderr
    # a run that held nothing out (real data without --val-every) has nothing to re-score
    ckpt["config"]["val_split"], ckpt["config"]["source"]["validation"] = "0", {"liver": [], "spleen": []}
    torch.save(ckpt, ckpt_path)
    none = run("experiments.py", "eval-options", str(cand))
    assert none.returncode == 2 and "held out no validation cases" in none.stderr, none.stderr


def test_paper_preset_runs_end_to_end(tmp_path, cache):
    # the original's recipe at a tiny size: one round, one step, one epoch of head fine-tuning
    out = tmp_path / "paper"
    result = tiny("segviz", out, cache, "--preset", "paper", "--rounds", "1", "--finetune-epochs", "1",
                  "--max-cases", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = metrics["config"]
    assert (cfg["loss"], cfg["unet"]["norm"], cfg["unet"]["channels"]) == ("dice", "batch", [16, 32, 64, 128, 256])
    assert (cfg["roi"], cfg["blend"], cfg["largest"], cfg["shared_rep"]) == ([160, 160, 160], "constant", False, False)
    assert any("kept the model of round 1" in e for e in metrics["events"])
    assert sum("fine-tuned" in e for e in metrics["events"]) == 2
    states = torch.load(out / "model.pt", weights_only=True)["states"]
    liver, spleen = states["liver"], states["spleen"]
    # parameters of the representation were averaged (and frozen while the heads fine-tuned);
    # BatchNorm statistics are buffers: they stayed local, as in the original
    params = [k for k in liver if k.startswith("rep.") and not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked"))]
    assert params and all(torch.equal(liver[k], spleen[k]) for k in params)
    stat = "rep.down.0.units.0.norm.running_mean"
    assert not torch.equal(liver[stat], spleen[stat])
    assert not torch.equal(liver["task.up.0.up.conv.weight"], spleen["task.up.0.up.conv.weight"])


def test_head_fine_tuning_keeps_one_shared_representation_with_batchnorm(tmp_path, cache):
    # the phantom preset shares normalisation statistics: fine-tuning a head (in training mode,
    # so BatchNorm's running statistics move) must leave every site the same representation
    out = tmp_path / "ft"
    result = tiny("segviz", out, cache, "--norm", "batch", "--finetune-epochs", "1", "--max-cases", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["config"]["shared_rep"]
    liver, spleen = ckpt["states"]["liver"], ckpt["states"]["spleen"]
    rep = [k for k in liver if k.startswith("rep.")]
    assert "rep.down.0.units.0.norm.running_mean" in rep and all(torch.equal(liver[k], spleen[k]) for k in rep)
    assert not torch.equal(liver["task.up.0.up.conv.weight"], spleen["task.up.0.up.conv.weight"])


def test_variants_that_do_not_fit_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    both = run("experiments.py", "train", "--mode", "central", "--oracle", "--marginal", "--out", str(out))
    assert both.returncode == 2 and "--oracle and --marginal cannot be combined" in both.stderr
    suite = run("experiments.py", "suite", "--out", str(out), "--dropout", "0.2")
    assert suite.returncode == 2 and "python experiments.py train" in suite.stderr
    assert not out.exists()


def test_the_state_is_saved_after_the_first_and_last_round_and_spaced_by_its_cost(tmp_path, monkeypatch):
    # a fake clock: a round takes 1 s, a save 0.125 s; with SAVE_SPACING 50 the state is written
    # again once 6.25 s of training have passed since the last save
    cases = {s: [Case(f"{s}-0", torch.rand(48, 48, 32), (torch.rand(48, 48, 32) > 0.9).to(torch.uint8), (3.0,) * 3)]
             for s in ("liver", "spleen")}
    run = training.build_run(resolve(Config(nodes=2, rounds=16, out=str(tmp_path))), cases, training.Extensions())
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

    monkeypatch.setattr(training, "SAVE_SPACING", 50)
    monkeypatch.setattr(training, "time", FakeTime)
    monkeypatch.setattr(fl, "federated_round", fake_round)
    monkeypatch.setattr(training, "save_state", fake_save)
    training.rounds_loop(run, {}, 0)
    assert saved == [1, 8, 15, 16]


def test_the_seed_sets_the_initial_weights(tmp_path, cache, monkeypatch):
    # the weights a run starts from: equal under one seed, different under another (train()
    # seeds torch before it builds the model, whatever else it draws first)
    class Started(Exception):
        pass

    def first_state(run, val_cases, start):
        raise Started({k: v.clone() for k, v in run.clients[0].model_state.items()})

    monkeypatch.setattr(training, "rounds_loop", first_state)
    states = []
    for seed in (0, 0, 1):
        cfg = resolve(Config(nodes=2, seed=seed, max_cases=1, spacing=(6.0, 6.0, 6.0), cache=str(cache),
                             out=str(tmp_path / f"seed-{seed}")))
        with pytest.raises(Started) as stopped:
            training.train(cfg)
        states.append(stopped.value.args[0])
    a, b, c = states
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
