"""The U-Net: shapes, the rep./task. split of its weights, and the task-block ablation."""

import pytest
import torch

from unet3d import UNet3D, UNetConfig

SMALL = (4, 8, 16)


@pytest.mark.parametrize("down", ["stride", "pool"])
@pytest.mark.parametrize("up", ["transpose", "interp"])
@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_output_has_input_size_and_one_channel_per_class(down, up, norm):
    model = UNet3D(UNetConfig(out_channels=3, channels=SMALL, down=down, up=up, norm=norm, act="prelu"))
    y = model(torch.randn(2, 1, 16, 12, 8))
    assert y.shape == (2, 3, 16, 12, 8)


def test_every_key_is_representation_or_task():
    keys = UNet3D(UNetConfig(channels=SMALL)).state_dict().keys()
    assert all(k.startswith(("rep.", "task.")) for k in keys)
    assert any(k.startswith("rep.") for k in keys) and any(k.startswith("task.") for k in keys)


def test_default_task_block_is_last_decoder_stage_plus_output_conv():
    model = UNet3D(UNetConfig(channels=SMALL))
    assert len(model.task.up) == 1 and len(model.rep.up) == len(SMALL) - 2
    # the last stage works at full resolution: its conv block outputs channels[0]
    assert model.task.up[0].block.conv2.out_channels == SMALL[0]
    assert model.task.out.in_channels == SMALL[0]


@pytest.mark.parametrize("stages", [0, 1, 2])
def test_task_stages_moves_decoder_stages_between_blocks(stages):
    model = UNet3D(UNetConfig(channels=SMALL, task_stages=stages))
    assert len(model.task.up) == stages
    assert len(model.rep.up) == len(SMALL) - 1 - stages
    task_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("task."))
    out_conv = sum(p.numel() for p in model.task.out.parameters())
    assert (task_params > out_conv) == (stages > 0)


def test_forward_is_features_then_head():
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(channels=SMALL, task_stages=2)).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    h, skips = model.features(x)
    assert len(skips) == 2  # the two task stages still need their skips
    torch.testing.assert_close(model.head(h, skips), model(x), rtol=0, atol=0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        UNetConfig(channels=SMALL, task_stages=3)
    with pytest.raises(ValueError):
        UNetConfig(norm="group")


def test_config_round_trips_through_a_plain_dict():
    cfg = UNetConfig(channels=SMALL, task_stages=2, norm="batch")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
