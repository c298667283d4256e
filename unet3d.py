"""A hand-written 3D U-Net whose weights split into a shared representation and a task head.

Every parameter and buffer lives under one of two prefixes of the state dict:

    rep.*   the representation block: the whole encoder, the bottleneck and the first
            decoder stages. In SegViz this is what the sites average.
    task.*  the task block: the last `task_stages` decoder stages and the output
            convolution. In SegViz it never leaves its site.

The default (`task_stages=1`) mirrors the original SegViz code, which kept the last
up-block of MONAI's UNet (`model.2`) local. The module knows nothing of federation;
it only exposes `features` (the representation's output) and `head` (the task block)
so that a meta-model can run one representation under several heads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = (8, 16, 32, 64)  # one entry per resolution level
    norm: str = "instance"  # "instance" (default: small batches of patches) or "batch"
    act: str = "leakyrelu"  # or "prelu"
    down: str = "stride"  # "stride" (strided conv) or "pool" (max pooling)
    up: str = "transpose"  # "transpose" (transposed conv) or "interp" (trilinear + conv)
    task_stages: int = 1  # decoder stages (counted from the output) kept in the task block

    def __post_init__(self) -> None:
        levels = len(self.channels)
        if levels < 2:
            raise ValueError("channels needs at least two levels")
        if not 0 <= self.task_stages <= levels - 1:
            raise ValueError(f"task_stages must be in 0..{levels - 1} for {levels} levels")
        for name, value, allowed in (
            ("norm", self.norm, ("instance", "batch")),
            ("act", self.act, ("leakyrelu", "prelu")),
            ("down", self.down, ("stride", "pool")),
            ("up", self.up, ("transpose", "interp")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**{**d, "channels": tuple(d["channels"])})


def _norm(kind: str, ch: int) -> nn.Module:
    # affine instance norm: its scale and shift are what FedBN keeps local
    if kind == "instance":
        return nn.InstanceNorm3d(ch, affine=True)
    return nn.BatchNorm3d(ch)


def _act(kind: str, ch: int) -> nn.Module:
    return nn.PReLU(ch) if kind == "prelu" else nn.LeakyReLU(0.01, inplace=True)


class ConvBlock(nn.Module):
    """Two 3x3x3 convolutions, each followed by norm and activation; the first may stride."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(cfg.norm, cout)
        self.act1 = _act(cfg.act, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cfg.norm, cout)
        self.act2 = _act(cfg.act, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(x)))


class DownStage(nn.Module):
    """Halve the resolution (strided conv or max pool), then a conv block."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig):
        super().__init__()
        self.pool = nn.MaxPool3d(2) if cfg.down == "pool" else nn.Identity()
        self.block = ConvBlock(cin, cout, cfg, stride=2 if cfg.down == "stride" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(x))


class UpStage(nn.Module):
    """Double the resolution, concatenate the skip connection, then a conv block."""

    def __init__(self, cin: int, cskip: int, cout: int, cfg: UNetConfig):
        super().__init__()
        self.mode = cfg.up
        if cfg.up == "transpose":
            self.up = nn.ConvTranspose3d(cin, cout, 2, stride=2)
        else:
            self.up = nn.Conv3d(cin, cout, 1)
        self.block = ConvBlock(cout + cskip, cout, cfg)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.mode == "interp":
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = self.up(x)
        else:
            x = self.up(x)
        return self.block(torch.cat([x, skip], dim=1))


class UNet3D(nn.Module):
    """Encoder-decoder with skips. Input sizes must be divisible by 2**(levels-1)."""

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self.cfg = cfg
        ch = cfg.channels
        levels = len(ch)
        # decoder stage i maps level i+1 back to level i; stages are listed output-last
        decoder = [UpStage(ch[i + 1], ch[i], ch[i], cfg) for i in reversed(range(levels - 1))]
        n_shared = len(decoder) - cfg.task_stages

        self.rep = nn.Module()
        self.rep.stem = ConvBlock(cfg.in_channels, ch[0], cfg)
        self.rep.down = nn.ModuleList(DownStage(ch[i], ch[i + 1], cfg) for i in range(levels - 1))
        self.rep.up = nn.ModuleList(decoder[:n_shared])
        self.task = nn.Module()
        self.task.up = nn.ModuleList(decoder[n_shared:])
        self.task.out = nn.Conv3d(ch[0], cfg.out_channels, 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The representation block: returns its output and the skips the head still needs."""
        skips = [self.rep.stem(x)]
        for stage in self.rep.down:
            skips.append(stage(skips[-1]))
        h = skips.pop()
        for stage in self.rep.up:
            h = stage(h, skips.pop())
        return h, skips

    def head(self, h: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The task block: the remaining decoder stages and the output convolution (logits)."""
        skips = list(skips)
        for stage in self.task.up:
            h = stage(h, skips.pop())
        return self.task.out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.features(x))

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.cfg.channels) - 1)
