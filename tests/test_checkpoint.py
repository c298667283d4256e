"""What a run leaves behind: model.pt and state.pt are read back whole or refused in one line;
a checkpoint rebuilds the config and the model it was tested with."""

import pytest
import torch

from checkpoint import (
    MODEL_FORMAT,
    STATE_FORMAT,
    config_of,
    model_checkpoint,
    model_of,
    read_checkpoint,
    read_state,
)
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
