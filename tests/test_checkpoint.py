"""What a run leaves behind: model.pt and state.pt are read back whole or refused in one line;
a checkpoint rebuilds the config and the model it was tested with; a seed's folder is kept,
resumed, trained or refused by what it holds."""

import os
from dataclasses import replace

import pytest
import torch

import checkpoint
import train
from checkpoint import (
    MODEL_FORMAT,
    STATE_FORMAT,
    config_of,
    model_checkpoint,
    model_of,
    read_checkpoint,
    read_state,
)
from data import Case
from helpers import finished_run
from segviz import MetaModel, MultiClassModel
from settings import resolve
from unet3d import UNet3D, UNetConfig


def test_read_checkpoint_reads_a_valid_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": MODEL_FORMAT, "weights": torch.arange(3.0)}, path)
    ckpt = read_checkpoint(str(path))
    assert ckpt["format"] == MODEL_FORMAT
    assert torch.equal(ckpt["weights"], torch.arange(3.0))


def assert_exit_2(path, capsys):
    """Loading `path` exits with status 2 after one line on stderr naming the file; returns that
    line."""
    with pytest.raises(SystemExit) as exc:
        read_checkpoint(str(path))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(path) in err and err.count("\n") == 1
    return err


def test_read_checkpoint_missing_file_exits_2(tmp_path, capsys):
    assert "no such file" in assert_exit_2(tmp_path / "absent.pt", capsys)


def test_read_checkpoint_truncated_file_exits_2(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"format": MODEL_FORMAT, "weights": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_exit_2(path, capsys)


def test_read_checkpoint_garbage_file_exits_2(tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(b"this is not a checkpoint\x00\xff" * 10)
    assert_exit_2(path, capsys)


def test_read_checkpoint_foreign_torch_file_exits_2(tmp_path, capsys):
    # readable by torch.load but not written by train.py
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    assert_exit_2(path, capsys)


def test_a_state_file_is_not_a_checkpoint_and_the_reverse(tmp_path, capsys):
    path = tmp_path / "state.pt"
    torch.save({"format": STATE_FORMAT}, path)
    assert read_state(str(path))["format"] == STATE_FORMAT
    with pytest.raises(SystemExit):
        read_checkpoint(str(path))
    assert "not a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["segviz", "fedavg"])
def test_a_checkpoint_gives_back_the_config_and_the_model_it_was_tested_with(mode, tmp_path):
    cfg = resolve(
        {
            "mode": mode,
            "nodes": 2,
            "preset": "paper",
            "overlap": 0.5,
            "channels": (4, 8, 16, 32, 64),
        }
    )
    binary = mode == "segviz"
    unet = UNetConfig(classes=2 if binary else 3, channels=cfg.channels, norm=cfg.norm)
    state = UNet3D(unet).state_dict()
    states = {"liver": state, "spleen": state} if binary else {"global": state}
    windows = {"liver": (-200.0, 200.0), "spleen": (-57.0, 164.0)}
    ckpt = model_checkpoint(
        cfg, "run", ["liver", "spleen"], unet, states, binary, windows, {}, {}, {}
    )
    torch.save(ckpt, tmp_path / "model.pt")
    back = read_checkpoint(str(tmp_path / "model.pt"))
    again = config_of(back, device="cpu")
    assert (again.roi, again.overlap, again.blend, again.largest) == (
        (160, 160, 160),
        0.5,
        "constant",
        False,
    )
    model = model_of(back)
    assert isinstance(model, MetaModel if binary else MultiClassModel)
    if binary:
        assert model.windows == {"liver": (-200.0, 200.0), "spleen": (-57.0, 164.0)}


# ---------------------------------------------------------------------------------------
# A seed's folder: kept, resumed, trained or refused
# ---------------------------------------------------------------------------------------


def refusal(capsys, call) -> str:
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_finished_seed_is_kept_and_a_run_of_other_settings_refused(tmp_path, capsys):
    from settings import saved

    cfg = resolve({"out": str(tmp_path)})
    finished_run(tmp_path / "seed-0", replace(cfg, seed=0))
    plan = checkpoint.plan_seeds(cfg, [0, 1], {}, overwrite=False)
    assert [(c.seed, action) for c, action in plan] == [(0, "keep"), (1, "train")]
    # a run made before a setting existed: the setting takes its default, the run is the same
    older = {k: v for k, v in saved(replace(cfg, seed=0)).items() if k != "amp"}
    finished_run(tmp_path / "seed-0", replace(cfg, seed=0), config=older)
    assert checkpoint.seed_action(replace(cfg, seed=0, out=str(tmp_path / "seed-0")), {}) == "keep"
    # its model deleted to save space: still finished, still its settings
    (tmp_path / "seed-0" / "model.pt").unlink()
    assert checkpoint.seed_action(replace(cfg, seed=0, out=str(tmp_path / "seed-0")), {}) == "keep"
    other = replace(cfg, rounds=cfg.rounds + 1)
    line = refusal(capsys, lambda: checkpoint.plan_seeds(other, [0], {}, overwrite=False))
    assert "seed-0: holds a run of other settings (rounds)" in line and "--overwrite" in line
    assert "--resume" in line and "--rounds N" in line  # a longer run is a resumed one
    line = refusal(capsys, lambda: checkpoint.plan_seeds(cfg, [0], {"marginal": True}, False))
    assert "other settings (the variant)" in line
    assert (tmp_path / "seed-0" / "metrics.json").exists(), "a refusal touches nothing"


def test_a_stopped_seed_of_other_settings_is_refused_not_resumed(tmp_path, capsys):
    cases = {s: [Case(f"{s}-0", torch.rand(48, 48, 32),
                      (torch.rand(48, 48, 32) > 0.9).to(torch.uint8), (3.0,) * 3)]
             for s in ("liver", "spleen")}
    cfg = resolve({"nodes": 2, "out": str(tmp_path / "seed-0")})
    train.save_state(train.build_run(cfg, cases, train.Extensions()), 1)
    assert checkpoint.seed_action(cfg, {}) == "resume"
    line = refusal(capsys, lambda: checkpoint.seed_action(replace(cfg, lr=cfg.lr / 2), {}))
    assert "holds a run of other settings (lr)" in line
    assert (tmp_path / "seed-0" / "state.pt").exists()


def test_the_data_is_the_same_data_however_its_path_is_written(tmp_path, monkeypatch):
    from settings import saved

    monkeypatch.chdir(tmp_path)
    (tmp_path / "msd").mkdir()
    relative = saved(resolve({"data_root": "msd", "data": {"test": "btcv"}}))
    absolute = saved(resolve({"data_root": str(tmp_path / "msd") + os.sep,
                              "data": {"test": str(tmp_path / "btcv")}}))
    assert checkpoint.identity(relative, {}) == checkpoint.identity(absolute, {})
    assert checkpoint.identity(relative, {}) != checkpoint.identity(
        saved(resolve({"data_root": str(tmp_path)})), {})
