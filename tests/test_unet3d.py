"""The U-Net: equal to MONAI's residual UNet weight for weight, and its rep./task. split."""

import pytest
import torch

from unet3d import UNet3D, UNetConfig

SMALL = (4, 8, 16)
PAPER = UNetConfig(
    channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), res_units=2, norm="batch", classes=2
)


def monai_unet(channels, norm="batch", classes=2, res_units=2):
    monai = pytest.importorskip("monai.networks.nets")
    from monai.networks.layers import Norm

    return monai.UNet(spatial_dims=3, in_channels=1, out_channels=classes, channels=channels,
                      strides=(2,) * (len(channels) - 1), num_res_units=res_units,
                      norm=Norm.BATCH if norm == "batch" else ("instance", {"affine": True}))


def residual_unit_map(monai_prefix: str, ours: str, subunits: int) -> dict[str, str]:
    """MONAI ResidualUnit keys -> ours: conv.unitK.{conv,adn.N,adn.A} -> units.K.{conv,norm,act}."""
    m = {f"{monai_prefix}.residual": f"{ours}.residual"}
    for k in range(subunits):
        m[f"{monai_prefix}.conv.unit{k}.conv"] = f"{ours}.units.{k}.conv"
        m[f"{monai_prefix}.conv.unit{k}.adn.N"] = f"{ours}.units.{k}.norm"
        m[f"{monai_prefix}.conv.unit{k}.adn.A"] = f"{ours}.units.{k}.act"
    return m


def monai_key_map(levels: int, task_stages: int, res_units: int = 2) -> dict[str, str]:
    """Module prefixes of MONAI's nested UNet -> ours, written out level by level.

    MONAI nests each level as Sequential(down, SkipConnection(deeper levels), up): level i sits
    under `model.` followed by i times `1.submodule.`; the innermost submodule is the bottom unit.
    """
    m = {}
    top = levels - 2
    for i in range(top + 1):
        at = "model." + "1.submodule." * i
        m |= residual_unit_map(f"{at}0", f"rep.down.{i}", res_units)
        ours = f"task.up.{task_stages - 1 - i}" if i < task_stages else f"rep.up.{top - i}"
        m[f"{at}2.0.conv"] = f"{ours}.up.conv"
        m[f"{at}2.0.adn.N"] = f"{ours}.up.norm"
        m[f"{at}2.0.adn.A"] = f"{ours}.up.act"
        m |= residual_unit_map(f"{at}2.1", f"{ours}.unit", 1)
    m |= residual_unit_map("model." + "1.submodule." * top + "1.submodule", "rep.bottom", res_units)
    return m


def copy_monai_weights(monai_model, ours: UNet3D, task_stages: int = 1, res_units: int = 2) -> None:
    prefixes = monai_key_map(len(ours.cfg.channels), task_stages, res_units)
    target = ours.state_dict()
    mapped = {}
    for key, value in monai_model.state_dict().items():
        module, name = key.rsplit(".", 1)
        mapped[f"{prefixes[module]}.{name}"] = value
    assert set(mapped) == set(target), set(mapped) ^ set(target)
    ours.load_state_dict(mapped)


@pytest.mark.parametrize("task_stages", [1, 2])
def test_equals_monai_unet_in_train_and_eval_mode(task_stages):
    torch.manual_seed(0)
    reference = monai_unet(PAPER.channels)
    ours = UNet3D(UNetConfig(**{**PAPER.to_dict(), "task_stages": task_stages,
                                "channels": PAPER.channels, "strides": PAPER.strides}))
    copy_monai_weights(reference, ours, task_stages)
    x = torch.randn(2, 1, 64, 64, 32)
    for train in (True, False):
        reference.train(train)
        ours.train(train)
        with torch.no_grad():
            diff = (reference(x) - ours(x)).abs().max().item()
        assert diff <= 1e-5, (train, diff)
    # train mode updated both sets of running statistics the same way
    torch.testing.assert_close(
        reference.state_dict()["model.0.conv.unit0.adn.N.running_mean"],
        ours.state_dict()["rep.down.0.units.0.norm.running_mean"],
        rtol=0,
        atol=1e-6,
    )


def test_equals_monai_with_instance_norm_and_other_widths():
    torch.manual_seed(1)
    reference = monai_unet((8, 16, 32, 64), norm="instance", classes=5)
    ours = UNet3D(UNetConfig(channels=(8, 16, 32, 64), norm="instance", classes=5))
    copy_monai_weights(reference, ours)
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert (reference.eval()(x) - ours.eval()(x)).abs().max().item() <= 1e-5


def test_parameter_counts_equal_the_original():
    ours = UNet3D(PAPER)
    assert sum(p.numel() for p in ours.parameters()) == 4_808_917
    assert sum(p.numel() for p in monai_unet(PAPER.channels).parameters()) == 4_808_917
    # the task block is MONAI's top up layer, model.2: what the original kept local
    task = sum(p.numel() for n, p in ours.named_parameters() if n.startswith("task."))
    assert task == 1_845
    model2 = sum(
        p.numel()
        for n, p in monai_unet(PAPER.channels).named_parameters()
        if n.startswith("model.2.")
    )
    assert task == model2


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_output_has_input_size_and_one_channel_per_class(norm):
    model = UNet3D(UNetConfig(classes=3, channels=SMALL, norm=norm))
    y = model(torch.randn(2, 1, 16, 12, 8))
    assert y.shape == (2, 3, 16, 12, 8)


def test_the_top_up_layer_ends_in_a_bare_convolution():
    model = UNet3D(UNetConfig(channels=SMALL))
    last = model.task.up[-1].unit.units[-1]
    assert list(dict(last.named_children())) == ["conv"]  # no norm, no activation on the logits
    inner = model.rep.up[0].unit.units[-1]
    assert list(dict(inner.named_children())) == ["conv", "norm", "act"]


def test_every_key_is_representation_or_task():
    keys = UNet3D(UNetConfig(channels=SMALL)).state_dict().keys()
    assert all(k.startswith(("rep.", "task.")) for k in keys)
    assert any(k.startswith("rep.") for k in keys) and any(k.startswith("task.") for k in keys)


@pytest.mark.parametrize("stages", [1, 2])
def test_task_stages_moves_up_layers_between_blocks(stages):
    model = UNet3D(UNetConfig(channels=SMALL, task_stages=stages))
    assert len(model.task.up) == stages
    assert len(model.rep.up) == len(SMALL) - 1 - stages


def test_forward_is_features_then_head():
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(channels=SMALL, task_stages=2)).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    h, skips = model.features(x)
    assert len(skips) == 2  # the two task layers still need their skips
    torch.testing.assert_close(model.head(h, skips), model(x), rtol=0, atol=0)


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        UNetConfig(channels=SMALL, task_stages=3)
    with pytest.raises(ValueError):
        UNetConfig(channels=SMALL, task_stages=0)
    with pytest.raises(ValueError):
        UNetConfig(norm="group")
    with pytest.raises(ValueError):
        UNetConfig(channels=SMALL, strides=(2,))


def test_config_round_trips_through_a_plain_dict():
    cfg = UNetConfig(channels=SMALL, task_stages=2, norm="instance")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
