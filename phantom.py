"""The built-in phantom federation: synthetic abdominal CTs in Hounsfield units, drawn in patient
coordinates (RAS, mm) on each site's acquisition grid (slice thickness, field of view, contrast
phase, noise), then resampled to the working spacing as real scans would be. Every case holds
every organ; a site differs only in which organ it labelled and how it scans (`ACQUISITIONS`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from common import save_torch_atomic
from data import ORGAN_ID, ORGANS, SITE_ORGAN, Case, body_box

Box = tuple[slice, slice, slice]  # a box of a grid, as indices
Spacing = tuple[float, float, float]  # mm

# ---------------------------------------------------------------------------------------
# Acquisitions
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acquisition:
    """How a site scans: grid spacing (mm), z field of view (mm), contrast phase, noise."""

    inplane: float
    slice_mm: float
    z_range: tuple[float, float]
    phase: str  # "venous" or "arterial"
    noise_hu: float
    fov_mm: float = 400.0


ACQUISITIONS = {
    "liver": Acquisition(1.8, 1.5, (-130.0, 150.0), "venous", 22.0, fov_mm=440.0),
    "spleen": Acquisition(2.2, 5.0, (-50.0, 140.0), "venous", 12.0),
    "pancreas": Acquisition(2.0, 2.5, (-90.0, 100.0), "venous", 18.0),
    "kidneys": Acquisition(2.0, 3.0, (-120.0, 60.0), "arterial", 16.0),
    "test": Acquisition(2.4, 3.5, (-120.0, 140.0), "venous", 15.0),
}


# ---------------------------------------------------------------------------------------
# Phantom anatomy
# ---------------------------------------------------------------------------------------

# Mean HU per tissue and phase; each case jitters them. Liver, spleen, pancreas and muscle
# lie within ~40 HU of each other, and kidneys overlap vessels and bone, so no organ can be
# found by intensity alone.
HU = {
    "venous": {
        "fat": -100,
        "muscle": 72,
        "liver": 105,
        "spleen": 112,
        "pancreas": 95,
        "kidney_cortex": 165,
        "kidney_medulla": 150,
        "aorta": 165,
        "ivc": 145,
        "portal": 160,
        "bowel_wall": 75,
        "fluid": 15,
        "gas": -850,
        "cortical": 700,
        "cancellous": 230,
        "csf": 15,
        "disc": 85,
        "tumour": 65,
        "gallbladder": 12,
    },
    "arterial": {
        "fat": -100,
        "muscle": 65,
        "liver": 78,
        "spleen": 130,
        "pancreas": 115,
        "kidney_cortex": 215,
        "kidney_medulla": 170,
        "aorta": 290,
        "ivc": 85,
        "portal": 110,
        "bowel_wall": 80,
        "fluid": 15,
        "gas": -850,
        "cortical": 700,
        "cancellous": 230,
        "csf": 15,
        "disc": 85,
        "tumour": 55,
        "gallbladder": 12,
    },
}
JITTER_HU = 10.0


@dataclass
class _Grid:
    """Voxel-centre coordinates (mm) of an acquisition grid, as broadcastable 1-D tensors."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.x), len(self.y), len(self.z))

    def box(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Index slices of the voxels inside the axis-aligned box [lo, hi] (None if empty)."""
        out = []
        for axis, a, b in zip((self.x, self.y, self.z), lo, hi):
            i0 = int(torch.searchsorted(axis, torch.tensor(float(a))))
            i1 = int(torch.searchsorted(axis, torch.tensor(float(b))))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl: Box) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            self.x[sl[0]][:, None, None],
            self.y[sl[1]][None, :, None],
            self.z[sl[2]][None, None, :],
        )


def _rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def _rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


@dataclass
class _Blob:
    """A smoothly deformed ellipsoid: inside where |R(p - c) / r| + wobble(q) < 1."""

    centre: np.ndarray
    radii: np.ndarray
    rot: np.ndarray
    waves: list[tuple[np.ndarray, float, float]] = field(default_factory=list)  # (freq, phase, amp)

    def field(self, grid: _Grid, sl: Box) -> torch.Tensor:
        x, y, z = grid.coords(sl)
        px, py, pz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        r = self.rot
        q = [(r[i, 0] * px + r[i, 1] * py + r[i, 2] * pz) / self.radii[i] for i in range(3)]
        d = torch.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        for freq, phase, amp in self.waves:
            d = d + amp * torch.sin(freq[0] * q[0] + freq[1] * q[1] + freq[2] * q[2] + phase)
        return d

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        extent = np.abs(self.rot.T) @ self.radii * 1.35
        return self.centre - extent, self.centre + extent

    def mask(self, grid: _Grid) -> tuple[Box | None, torch.Tensor | None, torch.Tensor | None]:
        """The blob's box on the grid, its inside there and its field (all None: off the grid)."""
        sl = grid.box(*self.bounds())
        if sl is None:
            return None, None, None
        f = self.field(grid, sl)
        return sl, f < 1.0, f


def _wobbly(
    rng: np.random.Generator,
    centre: Sequence[float],
    radii: Sequence[float],
    rot: np.ndarray | None = None,
    amp: float = 0.09,
    n: int = 4,
    shift_mm: float = 8.0,
    scale: float = 0.1,
) -> _Blob:
    """An ellipsoid with per-case random position, size and smooth surface deformation."""
    c = np.asarray(centre, float) + rng.normal(0, shift_mm / 2, 3).clip(-shift_mm, shift_mm)
    r = np.asarray(radii, float) * (1 + rng.uniform(-scale, scale, 3))
    rot = (rot if rot is not None else np.eye(3)) @ _rot_z(rng.uniform(-6, 6))
    waves = [(rng.normal(0, 1, 3) * 2.2, rng.uniform(0, 2 * math.pi), rng.uniform(0.4, 1.0) * amp)
             for _ in range(n)]
    return _Blob(c, r, rot, waves)


def _tube_field(grid: _Grid, sl: Box, points: np.ndarray, radii: np.ndarray) -> torch.Tensor:
    """Normalised distance to a polyline whose radius is interpolated along it (<1 inside)."""
    x, y, z = grid.coords(sl)
    best = None
    for a, b, ra, rb in zip(points[:-1], points[1:], radii[:-1], radii[1:]):
        ab = b - a
        t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab)
        t = t.clamp(0, 1)
        dist = torch.sqrt((x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2
                          + (z - a[2] - t * ab[2]) ** 2)
        d = dist / (ra + t * (rb - ra))
        best = d if best is None else torch.minimum(best, d)
    return best


def _smooth_noise(gen: torch.Generator, shape: Sequence[int], cells: int = 8) -> torch.Tensor:
    """A smooth random field in [-1, 1] (texture, lobulation)."""
    low = torch.rand((1, 1, cells, cells, cells), generator=gen) * 2 - 1
    return F.interpolate(low, size=shape, mode="trilinear", align_corners=True)[0, 0]


def _gaussian_blur(vol: torch.Tensor, sigmas_vox: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian blur (the scanner's point spread and slice profile), on PyTorch's own
    conv3d: for one channel and a 1-D kernel it is 2-10 times faster than oneDNN's, same numbers.
    The switch is process-wide: not for several threads at once (phantoms are made in one)."""
    out, mkldnn = vol[None, None], torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        for axis, s in enumerate(sigmas_vox):
            half = max(1, math.ceil(3 * s))
            k = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float32) / s) ** 2)
            k = (k / k.sum()).view([1, 1] + [len(k) if a == axis else 1 for a in range(3)])
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = half
            out = F.conv3d(F.pad(out, pad, mode="replicate"), k)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    return out[0, 0]


def _paint(hu: torch.Tensor, sl: Box, mask: torch.Tensor, value: float | torch.Tensor) -> None:
    region = hu[sl]
    region[mask] = value[mask] if torch.is_tensor(value) else float(value)


def phantom_case(seed: int, site: str) -> tuple[torch.Tensor, torch.Tensor, Spacing]:
    """One synthetic abdominal CT on the site's acquisition grid.

    Returns (hu, labels, spacing): HU float32 (x, y, z), a uint8 map with ORGAN_ID values for
    every organ (5 marks liver tumours), and the grid spacing in mm.
    """
    acq = ACQUISITIONS[site]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    tone = {k: v + rng.normal(0, JITTER_HU) if k not in ("gas", "cortical") else v
            for k, v in HU[acq.phase].items()}

    half = acq.fov_mm / 2
    nxy = round(acq.fov_mm / acq.inplane)
    nz = round((acq.z_range[1] - acq.z_range[0]) / acq.slice_mm)
    axis_xy = (torch.arange(nxy, dtype=torch.float32) + 0.5) * acq.inplane - half
    axis_z = (torch.arange(nz, dtype=torch.float32) + 0.5) * acq.slice_mm + acq.z_range[0]
    grid = _Grid(axis_xy, axis_xy.clone(), axis_z)
    full = (slice(None),) * 3
    x, y, z = grid.coords(full)

    hu = torch.full(grid.shape, -1000.0)
    lab = torch.zeros(grid.shape, dtype=torch.uint8)

    # body: an elliptic cylinder whose width drifts with z, fat under the skin, a muscle wall
    ax = 160 * (1 + rng.uniform(-0.1, 0.1)) * (1 + 0.0006 * (z - 0))
    ay = 115 * (1 + rng.uniform(-0.1, 0.1)) * torch.ones_like(z)
    yc = 10.0
    body = (x / ax) ** 2 + ((y - yc) / ay) ** 2
    fat_t = rng.uniform(12, 28)
    inner = (x / (ax - fat_t)) ** 2 + ((y - yc) / (ay - fat_t)) ** 2
    wall = (x / (ax - fat_t - 10)) ** 2 + ((y - yc) / (ay - fat_t - 10)) ** 2
    texture = _smooth_noise(gen, grid.shape, 10)
    hu.masked_fill_(body < 1, tone["fat"])
    hu.masked_fill_((inner < 1) & (wall >= 1), tone["muscle"])
    hu = torch.where(wall < 1, tone["fat"] + 15 * texture, hu)

    # bowel loops and colon in the lower and anterior abdomen: walls, fluid and gas
    for _ in range(int(rng.integers(14, 22))):
        c = [rng.uniform(-110, 110), rng.uniform(-10, 80), rng.uniform(-120, 10)]
        blob = _wobbly(rng, c, [rng.uniform(12, 22)] * 3, amp=0.15, shift_mm=0)
        sl, m, f = blob.mask(grid)
        if sl is None:
            continue
        content = rng.choice(["gas", "fluid", "bowel_wall"], p=[0.35, 0.4, 0.25])
        _paint(hu, sl, m, tone["bowel_wall"])
        _paint(hu, sl, f < 0.7, tone[content])
    # duodenum: a fluid-filled C around the pancreatic head
    duo = np.array([[35, 25, 15], [60, 15, -5], [62, 10, -35], [40, 12, -55], [10, 15, -55]], float)
    duo += rng.normal(0, 4, duo.shape)
    sl = grid.box(duo.min(0) - 20, duo.max(0) + 20)
    if sl is not None:
        f = _tube_field(grid, sl, duo, np.full(len(duo), rng.uniform(10, 14)))
        _paint(hu, sl, f < 1, tone["bowel_wall"])
        _paint(hu, sl, f < 0.6, tone["fluid"])
    # stomach: left upper quadrant, gas anterior over fluid
    stomach = _wobbly(rng, [-50, 45, 55], [48, 32, 45], amp=0.1)
    sl, m, f = stomach.mask(grid)
    if sl is not None:
        _paint(hu, sl, m, tone["bowel_wall"])
        _, yy, _ = grid.coords(sl)
        lumen = f < 0.8
        _paint(hu, sl, lumen, tone["fluid"])
        _paint(
            hu,
            sl,
            lumen & (yy > stomach.centre[1] + rng.uniform(0, 15)).expand_as(lumen),
            tone["gas"],
        )

    # solid organs, painted after the bowel so that they win where they touch
    organ_masks = {}
    # liver: a right lobe and a left lobe reaching across the midline, minus the gallbladder
    right_lobe = _wobbly(rng, [70, 5, 55], [72, 82, 78], _rot_x(10))
    left_lobe = _wobbly(rng, [-5, 40, 75], [62, 38, 38], _rot_z(-15))
    liver_sl = grid.box(np.minimum(right_lobe.bounds()[0], left_lobe.bounds()[0]),
                        np.maximum(right_lobe.bounds()[1], left_lobe.bounds()[1]))
    liver = (right_lobe.field(grid, liver_sl) < 1) | (left_lobe.field(grid, liver_sl) < 1)
    liver &= (wall < 1).expand(grid.shape)[liver_sl]
    liver_tex = tone["liver"] + 6 * _smooth_noise(gen, liver.shape, 6)
    _paint(hu, liver_sl, liver, liver_tex)
    organ_masks["liver"] = (liver_sl, liver)
    # portal and hepatic vessels: bright tubes inside the liver (not liver label in BTCV terms,
    # but inside the organ outline as annotators draw it, so they stay liver)
    for _ in range(3):
        a = np.array([rng.uniform(30, 60), rng.uniform(-10, 20), rng.uniform(20, 50)])
        b = a + rng.normal(0, 1, 3) * np.array([40, 30, 30])
        sl = grid.box(np.minimum(a, b) - 8, np.maximum(a, b) + 8)
        if sl is None:
            continue
        f = _tube_field(grid, sl, np.stack([a, b]), np.array([5.0, 3.0]))
        inside_liver = torch.zeros_like(f, dtype=torch.bool)
        _paint(hu, sl, (f < 1) & _restrict(liver_sl, liver, sl, inside_liver), tone["portal"])
    gallbladder = _wobbly(rng, [55, 45, -5], [16, 14, 32], _rot_x(-25), amp=0.05)
    sl, m, _ = gallbladder.mask(grid)
    if sl is not None:
        _paint(hu, sl, m, tone["gallbladder"])
        organ_masks["gallbladder"] = (sl, m)

    spleen = _wobbly(rng, [-92, -40, 65], [26, 55, 50], _rot_z(30), amp=0.12)
    sl, m, _ = spleen.mask(grid)
    m &= (wall < 1).expand(grid.shape)[sl]
    spleen_tex = tone["spleen"] + (12 if acq.phase == "arterial" else 4) * _smooth_noise(
        gen, m.shape, 8
    )
    _paint(hu, sl, m, spleen_tex)
    organ_masks["spleen"] = (sl, m)

    # pancreas: a lobulated tube from the head (right, in the duodenal C) to the tail at the spleen
    pts = np.array(
        [[35, 12, -35], [28, 18, -15], [5, 28, -5], [-30, 18, 5], [-62, 0, 18], [-80, -18, 28]],
        float,
    )
    pts += rng.normal(0, 4, pts.shape)
    rads = np.array([17, 14, 11, 11, 10, 9], float) * (1 + rng.uniform(-0.12, 0.12))
    sl = grid.box(pts.min(0) - 25, pts.max(0) + 25)
    lob = _smooth_noise(gen, grid.shape, 24)[sl]
    f = _tube_field(grid, sl, pts, rads) + 0.18 * lob
    pancreas = f < 1
    _paint(hu, sl, pancreas, tone["pancreas"] + 10 * lob)
    organ_masks["pancreas"] = (sl, pancreas)

    # kidneys: cortex and medulla, a fatty sinus at the medial hilum; the right one sits lower
    kidney_parts = []
    for side, centre in ((1, [62, -55, -40]), (-1, [-60, -50, -20])):
        k = _wobbly(rng, centre, [27, 24, 52], _rot_z(side * 20) @ _rot_x(10), amp=0.06)
        sl, m, f = k.mask(grid)
        if sl is None:
            continue
        xx, yy, _ = grid.coords(sl)
        sinus_c = k.centre - np.array([side * 16, -6, 0])
        sinus = ((xx - sinus_c[0]) / 13) ** 2 + ((yy - sinus_c[1]) / 11) ** 2 < 1
        sinus = sinus.expand_as(m) & (f < 0.75)
        parenchyma = m & ~sinus
        _paint(hu, sl, parenchyma, tone["kidney_cortex"])
        _paint(hu, sl, parenchyma & (f < 0.65), tone["kidney_medulla"])
        _paint(hu, sl, sinus, tone["fat"] + 40)
        kidney_parts.append((sl, parenchyma))
    organ_masks["kidneys"] = kidney_parts

    # liver tumours: hypodense nodules inside the liver (raw value 5; like MSD's tumour label 2)
    tumours = []
    for _ in range(int(rng.integers(0, 3))):
        idx = torch.nonzero(liver)
        if len(idx) == 0:
            break
        p = idx[int(rng.integers(len(idx)))]
        centre = np.array([float(grid.x[liver_sl[0]][p[0]]), float(grid.y[liver_sl[1]][p[1]]),
                           float(grid.z[liver_sl[2]][p[2]])])
        t = _wobbly(rng, centre, [rng.uniform(5, 12)] * 3, amp=0.1, shift_mm=0)
        tsl, tm, _ = t.mask(grid)
        if tsl is None:
            continue
        tm &= _restrict(liver_sl, liver, tsl, torch.zeros_like(tm))
        _paint(hu, tsl, tm, tone["tumour"])
        tumours.append((tsl, tm))

    # vessels and spine last: they are drawn over organs they would displace
    aorta_r, ivc_r = rng.uniform(9, 12), rng.uniform(9, 12)
    ac, ic = (
        (-14 + rng.normal(0, 3), -22 + rng.normal(0, 3)),
        (22 + rng.normal(0, 3), -18 + rng.normal(0, 3)),
    )
    aorta = (x - ac[0]) ** 2 + (y - ac[1]) ** 2 < aorta_r ** 2
    ivc = (((x - ic[0]) / ivc_r) ** 2 + ((y - ic[1]) / (ivc_r * 0.75)) ** 2 < 1) & (z < 90)
    hu.masked_fill_(aorta, tone["aorta"])
    hu.masked_fill_(ivc, tone["ivc"])
    # psoas and paraspinal muscles
    for s in (1, -1):
        psoas_r = 10 + 0.12 * (-z).clamp(min=0)
        psoas = (((x - s * 38) / psoas_r) ** 2 + ((y + 48) / (psoas_r * 0.9)) ** 2 < 1) & (z < 20)
        hu.masked_fill_(psoas, tone["muscle"])
        para = ((x - s * 35) / 26) ** 2 + ((y + 98) / 20) ** 2 < 1
        hu.masked_fill_(para, tone["muscle"])
    # vertebrae with discs, spinal canal, posterior elements
    disc = torch.remainder(z - rng.uniform(0, 32), 32) < 7
    vb = x ** 2 + (y + 55) ** 2
    hu.masked_fill_(vb < 21 ** 2, tone["cortical"])
    hu.masked_fill_((vb < 18 ** 2) & ~disc, tone["cancellous"])
    hu.masked_fill_((vb < 21 ** 2) & disc, tone["disc"])
    post = ((x.abs() < 8) & (y < -76) & (y > -112)) | (((x.abs() - 14) ** 2 + (y + 82) ** 2) < 64)
    hu.masked_fill_(post & ~disc, tone["cortical"] - 150)
    hu.masked_fill_(x ** 2 + (y + 84) ** 2 < 9 ** 2, tone["csf"])
    # ribs: posterolateral arcs just inside the muscle wall, above the kidneys' lower poles
    rib_phase = rng.uniform(0, 26)
    rib_z = (torch.remainder(z - rib_phase, 26) < 9) & (z > -30)
    ring = (inner < 0.92) & (inner > 0.80) & (y < 40)
    hu.masked_fill_(ring & rib_z, tone["cortical"])

    # labels: the organ outlines, with what vessels and bone overwrote removed
    soft = (hu > -300) & (hu < 260)
    for organ in ORGANS:
        parts = organ_masks[organ]
        for part_sl, part in parts if organ == "kidneys" else [parts]:
            region = lab[part_sl]
            region[part & soft[part_sl]] = ORGAN_ID[organ]
    for tsl, tm in tumours:
        region = lab[tsl]
        region[tm & (region == ORGAN_ID["liver"])] = 5

    # the scanner: point spread in-plane, the slice profile along z, then quantum noise
    hu = _gaussian_blur(hu, (0.6, 0.6, 0.5))
    hu += acq.noise_hu * torch.randn(grid.shape, generator=gen)
    return hu, lab, (acq.inplane, acq.inplane, acq.slice_mm)


def _restrict(big_sl: Box, big_mask: torch.Tensor, sl: Box, out: torch.Tensor) -> torch.Tensor:
    """The part of `big_mask` (defined on the box big_sl) that falls into the box sl."""
    src, dst = [], []
    for b, s, n in zip(big_sl, sl, big_mask.shape):
        lo, hi = max(b.start, s.start), min(b.start + n, s.stop)
        if hi <= lo:
            return out
        src.append(slice(lo - b.start, hi - b.start))
        dst.append(slice(lo - s.start, hi - s.start))
    out[tuple(dst)] = big_mask[tuple(src)]
    return out


# ---------------------------------------------------------------------------------------
# From acquisition grid to working grid
# ---------------------------------------------------------------------------------------


def resample(hu: torch.Tensor, lab: torch.Tensor, spacing: Spacing, target: Spacing
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample to the target spacing: linear for the image, nearest for the labels. Both grids
    share their physical extent, so a structure keeps its position and size in millimetres."""
    size = [max(1, round(n * s / t)) for n, s, t in zip(hu.shape, spacing, target)]
    img = F.interpolate(hu[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(
        torch.uint8
    )
    return img, lab


@dataclass(frozen=True)
class PhantomSpec:
    """Sizes of the phantom federation."""

    cases: dict = field(
        default_factory=lambda: {"liver": 10, "spleen": 6, "pancreas": 9, "kidneys": 9, "test": 8}
    )
    spacing: Spacing = (3.0, 3.0, 3.0)


def site_label(raw: torch.Tensor, site: str) -> torch.Tensor:
    """What a site's annotators delivered, merged to its organ: tumour joins the liver."""
    organ = SITE_ORGAN[site]
    out = torch.zeros_like(raw)
    out[raw == ORGAN_ID[organ]] = ORGAN_ID[organ]
    if organ == "liver":
        out[raw == 5] = ORGAN_ID["liver"]
    return out


def phantom_cases(
    site: str, n: int, seed: int, spacing: Spacing, full_labels: bool = False, split: str = "train"
) -> list[Case]:
    """n preprocessed phantom cases of one site (the test set when site == 'test').

    `full_labels` keeps every organ's label, as only a phantom can (the `oracle` upper bound).
    `split="val"` draws a site's validation cases: other patients, scanned the same way."""
    cases = []
    for i in range(n):
        key = f"{seed}/{site}/{i}" if split == "train" else f"{seed}/{site}/{split}/{i}"
        case_seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
        hu, raw, acq_spacing = phantom_case(case_seed, site)
        hu, raw = resample(hu, raw, acq_spacing, spacing)
        box = body_box(hu)  # crop the air around the body
        hu, raw = hu[box].contiguous(), raw[box].contiguous()
        if site == "test" or full_labels:
            raw = raw.clone()
            raw[raw == 5] = ORGAN_ID["liver"]
            label = raw
        else:
            label = site_label(raw, site)
        name = f"{site}_{i:03d}" if split == "train" else f"{site}_{split}_{i:03d}"
        cases.append(Case(name, hu, label, tuple(spacing)))
    return cases


def phantom_validation(
    sites: tuple[str, ...],
    n: int,
    seed: int = 0,
    spec: PhantomSpec | None = None,
    cache_dir: str | None = None,
) -> dict[str, list[Case]]:
    """n validation cases per site, labelled as that site labels (for per-round validation)."""
    spec = spec or PhantomSpec()
    return {s: _cached(lambda s=s: phantom_cases(s, n, seed, spec.spacing, split="val"), cache_dir,
                       f"phantom-v2-val-{s}-{n}-{seed}-{spec.spacing}") for s in sites}


def phantom_federation(sites: tuple[str, ...], seed: int = 0, spec: PhantomSpec | None = None,
                       cache_dir: str | None = None, full_labels: bool = False
                       ) -> tuple[dict[str, list[Case]], list[Case]]:
    """The training cases of each site and the fully labelled test set, cached on disk.

    With `full_labels` the training cases carry every organ's label (the oracle)."""
    spec = spec or PhantomSpec()
    out = {}
    for site in (*sites, "test"):
        full = full_labels and site != "test"
        out[site] = _cached(
            lambda s=site, f=full: phantom_cases(s, spec.cases[s], seed, spec.spacing, f),
            cache_dir,
            f"phantom-v2-{site}-{spec.cases[site]}-{seed}-{spec.spacing}"
            + ("-full" if full else ""),
        )
    test = out.pop("test")
    return out, test


def _cached(make: Callable[[], list[Case]], cache_dir: str | None, key: str) -> list[Case]:
    if cache_dir is None:
        return make()
    path = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:16] + ".pt")
    if os.path.exists(path):
        try:
            blob = torch.load(path, weights_only=True)
            return [Case(c["name"], c["hu"], c["label"], tuple(c["spacing"])) for c in blob]
        except Exception:
            pass  # a damaged cache entry is rebuilt
    cases = make()
    os.makedirs(cache_dir, exist_ok=True)
    save_torch_atomic(
        [{"name": c.name, "hu": c.hu, "label": c.label, "spacing": list(c.spacing)} for c in cases],
        path,
    )
    return cases
