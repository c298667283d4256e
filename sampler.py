"""The device-resident patch sampler: batches of augmented training patches cut from a site's
volumes, which stay on the training device (one gather and one `grid_sample` a batch, no data
loader). Also the pooled source of the central model, which draws from each site in turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import ORGANS, Case, window


@dataclass(frozen=True)
class SamplerConfig:
    """What a site's batches look like; the run's settings fill in the first five fields."""

    patch: tuple[int, int, int] = (48, 48, 32)
    volumes_per_batch: int = 2
    patches_per_volume: int = 2
    pos: float = 1.0
    neg: float = 1.0
    augment: bool = True
    p_spatial: float = 0.5  # probability of a random in-plane rotation and scaling
    max_rotation_deg: float = 12.0  # about z, as the original's RandAffined (pi/15)
    max_scale: float = 0.1
    p_intensity: float = 0.5  # probability of each of scale and shift
    intensity: float = 0.1  # scale factor 1 +- 0.1 and shift +- 0.1 (of the [0, 1] window)
    max_candidates: int = 65536  # background centre candidates kept per volume

    @property
    def batch(self) -> int:
        return self.volumes_per_batch * self.patches_per_volume


class PatchSampler:
    """Cuts batches of augmented training patches from volumes held on one device.

    All volumes of a site are flattened into one buffer; a batch is one gather with index
    arithmetic, then one `grid_sample` for rotation and scaling. Centres are foreground or
    background voxels with probability pos/(pos+neg), like MONAI's RandCropByPosNegLabeld;
    a centre near the border is shifted so the patch stays inside (volumes smaller than
    the patch are zero-padded first). The context box that rotation and scaling read from
    is centred on the patch and reads zeros where it reaches past the border, so the patch
    keeps its centre voxel wherever that lies. Labels are cut with nearest-neighbour sampling.
    """

    def __init__(self, images: list[torch.Tensor], labels: list[torch.Tensor], cfg: SamplerConfig,
                 device: torch.device | str = "cpu", seed: int = 0):
        if not images or len(images) != len(labels):
            raise ValueError("PatchSampler needs one label per image and at least one image")
        self.cfg = cfg
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        patch = torch.tensor(cfg.patch)
        # the context box around a patch that any rotation/scaling can reach; C - P even,
        # so the identity transform is an exact crop
        g = 1 + cfg.max_scale
        c, s = (
            math.cos(math.radians(cfg.max_rotation_deg)),
            math.sin(math.radians(cfg.max_rotation_deg)),
        )
        px, py, pz = cfg.patch
        reach = torch.tensor([g * (c * px + s * py), g * (s * px + c * py), g * pz])
        ctx = torch.ceil(reach).long() if cfg.augment else patch.clone()
        ctx = ctx + (ctx - patch) % 2
        self.ctx = ctx.to(self.device)
        self.ctx_sides = tuple(int(c) for c in ctx)  # as Python ints: no device read per batch
        self.patch = patch.to(self.device)
        self.margin = (self.ctx - self.patch) // 2  # of the context box on each side of the patch
        self.grid = _identity_grid(cfg.patch, self.device)

        flat_img, flat_lab, shapes, offsets, fg, bg = [], [], [], [], [], []
        offset = 0
        cand_gen = torch.Generator().manual_seed(seed + 1)
        for img, lab in zip(images, labels):
            if img.shape != lab.shape or img.dim() != 3:
                raise ValueError(
                    f"image {tuple(img.shape)} and label {tuple(lab.shape)} must be equal 3-D"
                )
            pad = [(0, 0)] * 3
            need = [max(0, p - s) for p, s in zip(cfg.patch, img.shape)]
            if any(need):
                pad = [(n // 2, n - n // 2) for n in need]
                flat_pad = [p for pair in reversed(pad) for p in pair]
                img = F.pad(img, flat_pad, value=0.0)
                lab = F.pad(lab, flat_pad, value=0)
            img, lab = img.float(), lab.to(torch.uint8)
            flat_lab_v = lab.flatten()
            pos_idx = torch.nonzero(flat_lab_v > 0).flatten()
            neg_idx = torch.nonzero((flat_lab_v == 0) & (img.flatten() > 0)).flatten()
            if len(neg_idx) == 0:
                neg_idx = torch.nonzero(flat_lab_v == 0).flatten()
            if len(neg_idx) > cfg.max_candidates:
                keep = torch.randperm(len(neg_idx), generator=cand_gen)[: cfg.max_candidates]
                neg_idx = neg_idx[keep.sort().values]
            fg.append(pos_idx)
            bg.append(neg_idx)
            flat_img.append(img.flatten())
            flat_lab.append(flat_lab_v)
            shapes.append(img.shape)
            offsets.append(offset)
            offset += img.numel()
        d = self.device
        self.img = torch.cat([*flat_img, torch.zeros(1)]).to(d)
        self.lab = torch.cat([*flat_lab, torch.zeros(1, dtype=torch.uint8)]).to(d)
        self.shapes = torch.tensor(shapes, device=d)
        self.offsets = torch.tensor(offsets, device=d)
        self.fg, self.fg_start, self.fg_count = _pack(fg, d)
        self.bg, self.bg_start, self.bg_count = _pack(bg, d)

    def __len__(self) -> int:
        return len(self.shapes)

    def centres(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Volume index, patch centre (voxel) and whether it was drawn as foreground."""
        cfg, g, d = self.cfg, self.gen, self.device
        vols = torch.randint(len(self), (cfg.volumes_per_batch,), generator=g, device=d)
        vols = vols.repeat_interleave(cfg.patches_per_volume)
        want_fg = torch.rand(len(vols), generator=g, device=d) < cfg.pos / (cfg.pos + cfg.neg)
        # a volume without foreground gives background, one without background foreground
        want_fg = (want_fg & (self.fg_count[vols] > 0)) | (self.bg_count[vols] == 0)
        u = torch.rand(len(vols), generator=g, device=d)
        count = torch.where(want_fg, self.fg_count[vols], self.bg_count[vols])
        start = torch.where(want_fg, self.fg_start[vols], self.bg_start[vols])
        pick = start + (u * count).long().clamp(max=count - 1)
        flat = torch.where(want_fg, self.fg[pick.clamp(max=len(self.fg) - 1)],
                           self.bg[pick.clamp(max=len(self.bg) - 1)])
        shape = self.shapes[vols]
        centre = torch.stack(
            [
                flat // (shape[:, 1] * shape[:, 2]),
                (flat // shape[:, 2]) % shape[:, 1],
                flat % shape[:, 2],
            ],
            dim=1,
        )
        return vols, centre, want_fg

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: images (B, 1, *patch) float32 and labels (B, *patch) int64."""
        vols, centre, _ = self.centres()
        img, lab = self._cut(vols, centre)
        if self.cfg.augment:
            img, lab = self._spatial(img, lab)
            img = self._intensity(img)
        else:
            img, lab = img[:, None], lab
        return img, lab.long()

    def _cut(self, vols: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the context box of each patch: the patch around its centre, shifted to stay
        inside its volume, widened by the margin; what lies past the border reads as zero."""
        shape = self.shapes[vols]
        start = (centre - self.patch // 2).clamp(min=0)
        start = torch.minimum(start, shape - self.patch) - self.margin
        d, zero = self.device, len(self.img) - 1  # the buffers end in one zero voxel
        # each axis's share of the flat index; an index past the border adds `zero`, so that
        # the sum reaches it (and is clamped to it) exactly when some axis lies outside
        stride = torch.stack(
            [shape[:, 1] * shape[:, 2], shape[:, 2], torch.ones_like(shape[:, 2])], dim=1
        )
        part = []
        for a in range(3):
            i = start[:, a, None] + torch.arange(self.ctx_sides[a], device=d)
            part.append(
                torch.where((i >= 0) & (i < shape[:, a, None]), i * stride[:, a, None], zero)
            )
        flat = (
            self.offsets[vols, None, None, None]
            + part[0][:, :, None, None]
            + part[1][:, None, :, None]
            + part[2][:, None, None, :]
        ).clamp_(max=zero)
        # index_select on the flat index is ~2.5x faster than advanced indexing on CPU
        idx = flat.reshape(-1)
        return self.img.index_select(0, idx).view(flat.shape), self.lab.index_select(0, idx).view(
            flat.shape
        )

    def _spatial(self, img: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop the patch out of the context box under a random rotation about z and scaling."""
        cfg, g, d = self.cfg, self.gen, self.device
        b = img.shape[0]
        on = torch.rand(b, generator=g, device=d) < cfg.p_spatial
        ang = (
            (torch.rand(b, generator=g, device=d) * 2 - 1) * math.radians(cfg.max_rotation_deg) * on
        )
        scale = 1 + (torch.rand(b, 3, generator=g, device=d) * 2 - 1) * cfg.max_scale * on[:, None]
        cos, sin = torch.cos(ang), torch.sin(ang)
        a = torch.zeros(b, 3, 3, device=d)
        a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1], a[:, 2, 2] = cos, -sin, sin, cos, 1
        a = a * scale[:, None, :]
        # source offset = A @ output offset (voxels); normalise by the context and patch sizes
        theta_xyz = a * self.patch.float()[None, None, :] / self.ctx.float()[None, :, None]
        # grid_sample orders the grid (W, H, D) = our (z, y, x)
        rev = [2, 1, 0]
        theta = torch.zeros(b, 3, 4, device=d)
        theta[:, :, :3] = theta_xyz[:, rev][:, :, rev]
        grid = self.grid.expand(b, -1, -1).bmm(theta.transpose(1, 2)).view(b, *cfg.patch, 3)
        img = F.grid_sample(
            img[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        lab = F.grid_sample(lab[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)[:, 0]
        return img, lab.to(torch.uint8)

    def _intensity(self, img: torch.Tensor) -> torch.Tensor:
        cfg, g, d = self.cfg, self.gen, self.device
        b = img.shape[0]
        shape = (b, 1, 1, 1, 1)
        f = (torch.rand(shape, generator=g, device=d) * 2 - 1) * cfg.intensity
        f = f * (torch.rand(shape, generator=g, device=d) < cfg.p_intensity)
        o = (torch.rand(shape, generator=g, device=d) * 2 - 1) * cfg.intensity
        o = o * (torch.rand(shape, generator=g, device=d) < cfg.p_intensity)
        return img * (1 + f) + o


def _identity_grid(patch: tuple[int, int, int], device: torch.device | str) -> torch.Tensor:
    """F.affine_grid's identity grid of one patch as (1, N, 4), built once per sampler: the
    same numbers affine_grid would compute on every batch (align_corners=False)."""
    axes = [torch.linspace(-1, 1, n, device=device) * (n - 1) / n for n in patch]
    x, y, z = torch.meshgrid(axes[0], axes[1], axes[2], indexing="ij")
    # grid_sample's last axis is (W, H, D) = our (z, y, x)
    return torch.stack([z, y, x, torch.ones_like(x)], dim=-1).reshape(1, -1, 4)


def _pack(
    parts: list[torch.Tensor], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = torch.tensor([len(p) for p in parts])
    starts = torch.cumsum(counts, 0) - counts
    flat = torch.cat(parts) if sum(len(p) for p in parts) else torch.zeros(1, dtype=torch.long)
    return flat.to(device), starts.to(device), counts.to(device)


def site_sampler(
    cases: list[Case],
    hu_window: tuple[float, float],
    binary: bool,
    cfg: SamplerConfig,
    device: torch.device | str,
    seed: int,
    organs: int = len(ORGANS),
) -> PatchSampler:
    """A site's sampler over its cases, seen through `hu_window`. A binary model learns "its"
    organ against the rest; a multi-class model the ORGAN_ID classes of the first `organs`
    organs (the oracle's labels hold all four, also with fewer sites)."""
    images = [window(c.hu.clone(), hu_window) for c in cases]
    labels = [
        (c.label > 0).to(torch.uint8) if binary else torch.where(c.label <= organs, c.label, 0)
        for c in cases
    ]
    return PatchSampler(images, labels, cfg, device=sampler_device(device), seed=seed)


def sampler_device(device: torch.device | str) -> torch.device:
    """Where a site's patch sampler keeps its volumes and cuts batches: the training device, but
    the CPU on Apple's MPS. The sampler resamples labels with nearest-neighbour 3-D grid_sample,
    which MPS lacks (PyTorch 2.9 added bilinear only); batches are moved over after."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def round_robin(samplers: list[PatchSampler]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Pooled data (the central model): consecutive batches come from each site in turn.

    The position is kept in `next_batch.position` (a one-item list) so a resumed run goes on
    where it stopped."""
    position = [0]

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        s = samplers[position[0] % len(samplers)]
        position[0] += 1
        return s.sample()

    next_batch.position = position
    return next_batch
