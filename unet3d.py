"""The original SegViz network, written by hand: MONAI's residual `UNet`, split in two.

The original code trained MONAI's `UNet(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
num_res_units=2, norm=BATCH)`. This file builds the same topology in plain `torch.nn` (a test
copies MONAI's weights in and checks equal outputs), with every parameter and buffer under one
of two prefixes of the state dict:

    rep.*   the representation block: the encoder, the bottom unit and the deeper up layers.
            In SegViz this is what the sites average.
    task.*  the task block: the last `task_stages` up layers. With the default (1) that is
            exactly the original's local part, MONAI's top up layer `model.2`. It never
            leaves its site.

Each level halves the resolution with a residual unit whose first convolution strides, so
nothing but the top up layer runs at full resolution. On the way up, a level concatenates its
skip with the deeper output, then upsamples with a transposed convolution and refines with a
one-convolution residual unit. The top up layer ends in a bare convolution: its output is the
logits.

The module knows nothing of federation; `features` (the representation's output and the skips
the head still needs) and `head` let a meta-model run one representation under several heads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    classes: int = 2  # output channels: 2 for a binary site head, 1 + K for a K-organ model
    # one width per level, the last is the bottom
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] | None = None  # one per level but the bottom; None: all 2
    res_units: int = 2  # convolutions per down (and bottom) residual unit
    norm: str = "batch"  # "batch" (as the original) or "instance" (affine)
    task_stages: int = 1  # up layers, counted from the output, kept in the task block

    def __post_init__(self) -> None:
        levels = len(self.channels)
        if levels < 2:
            raise ValueError("channels needs at least two levels")
        if self.strides is None:
            object.__setattr__(self, "strides", (2,) * (levels - 1))
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "strides", tuple(self.strides))
        if len(self.strides) != levels - 1:
            raise ValueError(
                f"{levels} channel levels need {levels - 1} strides, got {len(self.strides)}"
            )
        if not 1 <= self.task_stages <= levels - 1:
            raise ValueError(f"task_stages must be in 1..{levels - 1} for {levels} levels")
        if self.res_units < 1:
            raise ValueError("res_units must be at least 1")
        if self.norm not in ("batch", "instance"):
            raise ValueError(f"norm must be 'batch' or 'instance', got {self.norm!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels), "strides": list(self.strides)}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**{**d, "channels": tuple(d["channels"]), "strides": tuple(d["strides"])})


def conv_unit(cin: int, cout: int, stride: int, norm: str, transposed: bool = False,
              conv_only: bool = False) -> nn.Sequential:
    """A 3x3x3 convolution (transposed: upsampling by `stride`), then norm and PReLU."""
    if transposed:
        conv = nn.ConvTranspose3d(cin, cout, 3, stride=stride, padding=1, output_padding=stride - 1)
    else:
        conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
    if conv_only:
        return nn.Sequential(OrderedDict(conv=conv))
    # affine instance norm, unlike MONAI's default: FedBN then has a scale and shift to keep local
    norm_layer = nn.BatchNorm3d(cout) if norm == "batch" else nn.InstanceNorm3d(cout, affine=True)
    return nn.Sequential(OrderedDict(conv=conv, norm=norm_layer, act=nn.PReLU()))


class ResidualUnit(nn.Module):
    """`subunits` conv units, the first of which may stride, plus a projected shortcut."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        subunits: int,
        norm: str,
        last_conv_only: bool = False,
    ):
        super().__init__()
        self.units = nn.Sequential(*(
            conv_unit(cin if i == 0 else cout, cout, stride if i == 0 else 1, norm,
                      conv_only=last_conv_only and i == subunits - 1)
            for i in range(subunits)))
        if stride != 1:  # the shortcut strides with the same 3x3x3 kernel
            self.residual = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        elif cin != cout:  # only the width changes: a 1x1x1 projection
            self.residual = nn.Conv3d(cin, cout, 1)
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x) + self.residual(x)


class UpLayer(nn.Module):
    """[skip, deeper] -> transposed convolution (upsampling) -> one-convolution residual unit."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, top: bool):
        super().__init__()
        self.up = conv_unit(cin, cout, stride, norm, transposed=True)
        self.unit = ResidualUnit(cout, cout, 1, 1, norm, last_conv_only=top)  # top: bare logits
        self.logits_layer = top

    def forward(self, skip: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        h = self.up(torch.cat([skip, deeper], dim=1))
        if self.logits_layer and h.device.type == "cpu":
            # The top unit convolves only the classes' few channels, at full resolution: oneDNN's
            # CPU kernels for so narrow a convolution are several times faster channels-last
            # (the training step of bench.py speed: 1.3x, docs/speed.md). The same arithmetic,
            # summed in another order.
            return self.unit(h.contiguous(memory_format=torch.channels_last_3d)).contiguous()
        return self.unit(h)


class UNet3D(nn.Module):
    """MONAI's residual UNet topology. Input sides must be divisible by `divisor`."""

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.cfg = cfg
        # `top`: the deepest strided level
        ch, st, top = cfg.channels, cfg.strides, len(cfg.channels) - 2

        def up_layer(level: int) -> UpLayer:
            # level `top` meets the bottom unit's output; the others meet the level below's up layer
            cin = ch[level] + (ch[level + 1] if level == top else ch[level])
            cout = cfg.classes if level == 0 else ch[level - 1]
            return UpLayer(cin, cout, st[level], cfg.norm, top=level == 0)

        self.rep = nn.Module()
        self.rep.down = nn.ModuleList(
            ResidualUnit(
                cfg.in_channels if i == 0 else ch[i - 1], ch[i], st[i], cfg.res_units, cfg.norm
            )
            for i in range(top + 1)
        )
        self.rep.bottom = ResidualUnit(ch[top], ch[top + 1], 1, cfg.res_units, cfg.norm)
        # up layers are listed deepest first, the order they run in
        self.rep.up = nn.ModuleList(up_layer(i) for i in reversed(range(cfg.task_stages, top + 1)))
        self.task = nn.Module()
        self.task.up = nn.ModuleList(up_layer(i) for i in reversed(range(cfg.task_stages)))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The representation block: its output and the skips the task block still needs."""
        skips = []
        for down in self.rep.down:
            x = down(x)
            skips.append(x)
        h = self.rep.bottom(x)
        for up in self.rep.up:
            h = up(skips.pop(), h)
        return h, skips

    def head(self, h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The task block: the remaining up layers, ending in the logits."""
        skips = list(skips)
        for up in self.task.up:
            h = up(skips.pop(), h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.features(x))

    @property
    def divisor(self) -> int:
        d = 1
        for s in self.cfg.strides:
            d *= s
        return d
