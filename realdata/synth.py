"""A second, independent synthetic federation, written to disk as the public archives unpack.

What it holds: abdominal CT volumes in Hounsfield units with their label maps, laid out as
the five datasets SegViz used, so that `python train.py --data-root OUT`
finds every one of them with the project's own real-data loaders (archives.find_sources):

    OUT/Task03_Liver/     dataset.json, imagesTr/liver_N.nii.gz, labelsTr/  liver 1, tumour 2
    OUT/Task09_Spleen/    dataset.json, imagesTr/spleen_N.nii.gz, labelsTr/ spleen 1
    OUT/Task07_Pancreas/  dataset.json, imagesTr/pancreas_NNN.nii.gz, ...    pancreas 1, tumour 2
    OUT/kits19/data/case_NNNNN/{imaging,segmentation}.nii.gz                 kidney 1, tumour 2
    OUT/Abdomen/RawData/Training/{img,label}/imgNNNN.nii.gz                  BTCV ids (below)
    OUT/synth_archives.json   what was drawn for every case (spacing, phase, noise, volumes)

BTCV ids: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 6 liver, 7 stomach, 8 aorta,
9 IVC, 10 portal and splenic vein, 11 pancreas. (--val-split: with 8 cases a site, the
original split, which holds out up to 56 cases, cannot apply.)

Why: the built-in phantom (phantom.py) is what the project's defaults were tuned on. This
generator is a check that those defaults carry beyond it, so it deliberately shares no code
and no modelling choices with phantom.py: it uses only numpy, scipy and nibabel;
the anatomy is drawn in patient coordinates as a tissue-class map (painting order and
"may overwrite" rules instead of direct HU painting), organ shapes come from a Gaussian-bump
displacement of tapered, bent or carved ellipsoids and from varying-radius tubes, intensities
are a per-phase tissue table with per-case shifts, a smooth Gaussian-kernel texture and
in-plane correlated noise; the scan is sampled on each archive's own grid (its spacing, slice
thickness with a box slice profile, array order and affine) and stored with each archive's own
label ids.

The anatomy (RAS, mm; patient origin on the body axis at the level of the renal hila):
body ellipse with skin, subcutaneous fat and a muscle wall, on a carbon-fibre table; lung
bases and heart above the diaphragm; lumbar spine (cortical shell, marrow, discs, canal,
posterior elements), ribs, psoas and paraspinal muscles; aorta, IVC, portal/splenic/mesenteric
and renal vessels; stomach with an air-fluid level, duodenum, colon with stool and gas, small
bowel loops (fluid, gas pockets, sometimes positive oral contrast); liver (a wedge tapering to
the left lobe, kept in front of the aorta), gallbladder, spleen (a crescent bent along the
wall), pancreas (a curved gland in front of the spine, 15-30 mm thick), two kidneys (beans
with cortex, medulla and renal sinus fat). Liver, pancreas and kidney cases may carry a tumour
(label 2; kidney tumours may bulge out of the kidney, as in KiTS19). Organ sizes vary by
+-10 % (linear), positions by up to +-15 mm, the pose by a few degrees, the body by its cavity
and fat. Measured over 30 cases (at acquisition): liver 1.0-1.8 L, spleen 170-330 mL,
pancreas 53-90 mL, each kidney 110-220 mL.
Contrast phase: portal-venous for the MSD tasks and BTCV, late arterial for KiTS19 (kidney
cortex ~240 HU over medulla ~115, bright aorta, heterogeneous spleen, liver ~80 HU).

Acquisition per archive (in-plane spacing is the archive's times --coarsen, default 2.5, to
keep files small; the field of view is cropped to the abdomen, ~300 x 240 x 170-200 mm):

    archive          in-plane mm   slices mm                 stored axes   image dtype  noise HU
    Task03_Liver     0.68-0.86     1 / 1.5 / 2 / 2.5 / 5     RAS or LPS    int16        16-24
    Task09_Spleen    0.70-0.90     5                         LPS           int16        10-14
    Task07_Pancreas  0.70-0.90     2.5                       RAS           int16        14-20
    kits19           0.70-0.90     3 / 5                     IPL           float32      12-18
    BTCV (Abdomen)   0.68-0.90     2.5 / 3 / 5               LAS           int16        12-18

The noise is the archive's at its own in-plane spacing; a coarsened image carries it divided
by --coarsen, as averaging coarsen x coarsen pixels would. (The axis orders of the MSD tasks
and of KiTS19 follow tests/realdata/layouts.py; BTCV's LAS is an assumption. LiTS, behind Task03, is
multi-centre, hence both orders there.) With the defaults (8 cases a site, 8 BTCV cases) the
federation is ~60 MB, every case under 4 MB, written in well under a minute on one core;
--coarsen 2 (in-plane ~1.6 mm) makes it ~90 MB.

Usage:  python -m realdata synth OUT [--cases 8] [--test-cases 8] [--seed 0] [--coarsen 2.5]
        [--overwrite]
Every case is drawn from (seed, archive, case index) alone: the same seed gives the same
files, and a smaller --cases gives the first cases of a larger run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

Box = tuple[slice, slice, slice]  # index slices of a grid
Point = np.ndarray | Sequence[float]  # a position or size in patient space, mm

ROLES = ("liver", "spleen", "pancreas", "kidneys", "test")

# ---------------------------------------------------------------------------------------
# Archives: where each dataset goes, how it was scanned, and its label ids
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Archive:
    role: str
    folder: str  # under OUT
    phase: str  # "portal" or "arterial" (late arterial)
    inplane: tuple[float, float]  # native in-plane spacing range, mm (before --coarsen)
    slices: tuple[tuple[float, float], ...]  # (slice thickness = spacing in mm, probability)
    codes: tuple[str, ...]  # stored array axis codes, one drawn per case
    noise: tuple[float, float]  # image noise standard deviation range, HU
    lesion: float  # probability that a case carries a labelled tumour
    dtype: type


ARCHIVES = {
    "liver": Archive(
        "liver",
        "Task03_Liver",
        "portal",
        (0.68, 0.86),
        ((1.0, 0.1), (1.5, 0.1), (2.0, 0.15), (2.5, 0.25), (5.0, 0.4)),
        ("RAS", "LPS"),
        (16.0, 24.0),
        0.85,
        np.int16,
    ),
    "spleen": Archive(
        "spleen",
        "Task09_Spleen",
        "portal",
        (0.70, 0.90),
        ((5.0, 1.0),),
        ("LPS",),
        (10.0, 14.0),
        0.0,
        np.int16,
    ),
    "pancreas": Archive(
        "pancreas",
        "Task07_Pancreas",
        "portal",
        (0.70, 0.90),
        ((2.5, 1.0),),
        ("RAS",),
        (14.0, 20.0),
        0.9,
        np.int16,
    ),
    "kidneys": Archive(
        "kidneys",
        os.path.join("kits19", "data"),
        "arterial",
        (0.70, 0.90),
        ((3.0, 0.5), (5.0, 0.5)),
        ("IPL",),
        (12.0, 18.0),
        0.9,
        np.float32,
    ),
    "test": Archive(
        "test",
        os.path.join("Abdomen", "RawData", "Training"),
        "portal",
        (0.68, 0.90),
        ((2.5, 0.35), (3.0, 0.35), (5.0, 0.3)),
        ("LAS",),
        (12.0, 18.0),
        0.0,
        np.int16,
    ),
}
TOP_FOLDERS = ("Task03_Liver", "Task09_Spleen", "Task07_Pancreas", "kits19", "Abdomen")
MANIFEST = "synth_archives.json"

# Case names as the archives number them (MSD spleen and pancreas and BTCV skip numbers).
_SPLEEN_IDS = (
    2,
    3,
    6,
    8,
    9,
    10,
    12,
    13,
    14,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    24,
    25,
    26,
    27,
    28,
    29,
    31,
    32,
    33,
    38,
    40,
    41,
    44,
    45,
    46,
    47,
    49,
    52,
    53,
    56,
    59,
    60,
    61,
    62,
    63,
)
_PANCREAS_IDS = (
    1,
    4,
    5,
    6,
    10,
    12,
    15,
    16,
    18,
    19,
    21,
    24,
    25,
    28,
    29,
    32,
    35,
    37,
    40,
    41,
    42,
    43,
    45,
    46,
    48,
)
_BTCV_IDS = (*range(1, 11), *range(21, 41))


def case_name(role: str, i: int) -> str:
    def pick(ids: tuple[int, ...], i: int) -> int:
        return ids[i] if i < len(ids) else ids[-1] + 1 + (i - len(ids))

    if role == "liver":
        return f"liver_{i}"
    if role == "spleen":
        return f"spleen_{pick(_SPLEEN_IDS, i)}"
    if role == "pancreas":
        return f"pancreas_{pick(_PANCREAS_IDS, i):03d}"
    if role == "kidneys":
        return f"case_{i:05d}"
    return f"img{pick(_BTCV_IDS, i):04d}"


# ---------------------------------------------------------------------------------------
# Tissues: the classes the anatomy is painted with, their HU per phase, and label ids
# ---------------------------------------------------------------------------------------

TISSUES = (
    "air",
    "table_shell",
    "table_foam",
    "skin",
    "fat",
    "muscle",
    "visceral_fat",
    "lung",
    "heart",
    "bone_cortex",
    "bone_marrow",
    "disc",
    "csf",
    "rib",
    "bowel_wall",
    "bowel_fluid",
    "bowel_gas",
    "oral_contrast",
    "stool",
    "stomach_wall",
    "stomach_content",
    "stomach_gas",
    "liver",
    "liver_lesion",
    "gallbladder",
    "spleen",
    "pancreas",
    "pancreas_lesion",
    "kidney_r_cortex",
    "kidney_r_medulla",
    "kidney_r_lesion",
    "kidney_l_cortex",
    "kidney_l_medulla",
    "kidney_l_lesion",
    "renal_sinus",
    "aorta",
    "ivc",
    "portal_vein",
    "splenic_vein",
    "mesenteric_vessel",
    "renal_artery",
    "renal_vein",
)
T = {name: i for i, name in enumerate(TISSUES)}

# (mean HU, texture amplitude HU) per phase; each case shifts every mean (see SHIFT_HU)
_PORTAL = {
    "air": (-1000, 0),
    "table_shell": (280, 20),
    "table_foam": (-960, 4),
    "skin": (25, 8),
    "fat": (-105, 10),
    "muscle": (55, 7),
    "visceral_fat": (-95, 14),
    "lung": (-860, 35),
    "heart": (130, 20),
    "bone_cortex": (820, 110),
    "bone_marrow": (220, 40),
    "disc": (90, 8),
    "csf": (15, 5),
    "rib": (480, 90),
    "bowel_wall": (85, 10),
    "bowel_fluid": (12, 6),
    "bowel_gas": (-1000, 0),
    "oral_contrast": (280, 40),
    "stool": (-35, 45),
    "stomach_wall": (90, 10),
    "stomach_content": (25, 12),
    "stomach_gas": (-1000, 0),
    "liver": (115, 6),
    "liver_lesion": (60, 12),
    "gallbladder": (10, 4),
    "spleen": (120, 5),
    "pancreas": (100, 12),
    "pancreas_lesion": (55, 10),
    "kidney_r_cortex": (185, 8),
    "kidney_r_medulla": (165, 8),
    "kidney_r_lesion": (120, 25),
    "kidney_l_cortex": (185, 8),
    "kidney_l_medulla": (165, 8),
    "kidney_l_lesion": (120, 25),
    "renal_sinus": (-70, 20),
    "aorta": (165, 6),
    "ivc": (150, 10),
    "portal_vein": (175, 6),
    "splenic_vein": (170, 6),
    "mesenteric_vessel": (165, 8),
    "renal_artery": (165, 6),
    "renal_vein": (170, 8),
}
_ARTERIAL = {
    **_PORTAL, "muscle": (50, 7), "heart": (230, 40), "liver": (80, 6), "liver_lesion": (95, 20),
    "spleen": (125, 8), "pancreas": (118, 12), "pancreas_lesion": (60, 10),
    "kidney_r_cortex": (240, 10), "kidney_r_medulla": (115, 10), "kidney_r_lesion": (150, 35),
    "kidney_l_cortex": (240, 10), "kidney_l_medulla": (115, 10), "kidney_l_lesion": (150, 35),
    "aorta": (330, 10), "ivc": (85, 20), "portal_vein": (125, 10), "splenic_vein": (150, 10),
    "mesenteric_vessel": (200, 20), "renal_artery": (330, 10), "renal_vein": (200, 15),
    "bowel_wall": (95, 10), "stomach_wall": (100, 10),
}
PHASES = {"portal": _PORTAL, "arterial": _ARTERIAL}
SHIFT_HU = 15.0  # each case shifts each tissue's mean by up to this (not air, gas, the table)
_UNSHIFTED = ("air", "bowel_gas", "stomach_gas", "table_shell", "table_foam")


def _lut(mapping: dict[str, int]) -> np.ndarray:
    out = np.zeros(len(TISSUES), np.uint8)
    for name, value in mapping.items():
        out[T[name]] = value
    return out


_KIDNEY_R = ("kidney_r_cortex", "kidney_r_medulla")
_KIDNEY_L = ("kidney_l_cortex", "kidney_l_medulla")
# tissue -> each archive's label id (MSD and KiTS19: organ 1, tumour 2; BTCV: its 13 ids, no tumour
# label)
LABELS = {
    "liver": _lut({"liver": 1, "liver_lesion": 2}),
    "spleen": _lut({"spleen": 1}),
    "pancreas": _lut({"pancreas": 1, "pancreas_lesion": 2}),
    "kidneys": _lut(
        {**dict.fromkeys(_KIDNEY_R + _KIDNEY_L, 1), "kidney_r_lesion": 2, "kidney_l_lesion": 2}
    ),
    "test": _lut(
        {
            "spleen": 1,
            **dict.fromkeys((*_KIDNEY_R, "kidney_r_lesion"), 2),
            **dict.fromkeys((*_KIDNEY_L, "kidney_l_lesion"), 3),
            "gallbladder": 4,
            "liver": 6,
            "liver_lesion": 6,
            "stomach_wall": 7,
            "stomach_content": 7,
            "stomach_gas": 7,
            "aorta": 8,
            "ivc": 9,
            "portal_vein": 10,
            "splenic_vein": 10,
            "pancreas": 11,
            "pancreas_lesion": 11,
        }
    ),
}
LABEL_NAMES = {
    "liver": {"0": "background", "1": "liver", "2": "cancer"},
    "spleen": {"0": "background", "1": "spleen"},
    "pancreas": {"0": "background", "1": "pancreas", "2": "cancer"},
    "kidneys": {"0": "background", "1": "kidney", "2": "tumor"},
    "test": {
        "0": "background",
        "1": "spleen",
        "2": "right kidney",
        "3": "left kidney",
        "4": "gallbladder",
        "6": "liver",
        "7": "stomach",
        "8": "aorta",
        "9": "inferior vena cava",
        "10": "portal vein and splenic vein",
        "11": "pancreas",
    },
}


def _may(*names: str) -> np.ndarray:
    """A boolean table over tissue classes: the classes a structure may overwrite."""
    out = np.zeros(len(TISSUES), bool)
    out[[T[n] for n in names]] = True
    return out


_GUT = ("bowel_wall", "bowel_fluid", "bowel_gas", "oral_contrast", "stool")
_STOMACH = ("stomach_wall", "stomach_content", "stomach_gas")
_KIDNEYS = (*_KIDNEY_R, *_KIDNEY_L, "renal_sinus")
# organs push aside fat and gut, never bone, muscle or lung
SOFT = _may("visceral_fat", *_GUT, *_STOMACH)
VESSEL = _may("visceral_fat", *_GUT, *_STOMACH, "liver", "pancreas", "spleen", "renal_sinus")
ANY_BODY = _may(*(n for n in TISSUES if n not in ("air", "table_shell", "table_foam")))

# ---------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------


def _rot(axis: int, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _mm(*v: float) -> np.ndarray:
    return np.array(v, float)


def _unit(v: Point) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _axes(u: Point, w: Point) -> np.ndarray:
    """Orthonormal local axes (columns u, v, w) from a first axis u and an approximate third w."""
    w = _unit(w)
    u = _unit(np.asarray(u, float) - (np.dot(u, w)) * w)
    return np.stack([u, np.cross(w, u), w], axis=1)


class Frame:
    """The sampling grid (world RAS axes) and the patient's pose in it: q = R^T (p - t)."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray, rot: np.ndarray, shift: np.ndarray
    ):
        self.axes = (x, y, z)
        self.rot, self.shift = rot, shift
        d = [(a - s).astype(np.float32) for a, s in zip(self.axes, shift)]
        dx, dy, dz = d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]
        rt = rot.T.astype(np.float32)
        self.q = tuple(rt[i, 0] * dx + rt[i, 1] * dy + rt[i, 2] * dz for i in range(3))
        self.shape = self.q[0].shape

    def world(self, p: Point) -> np.ndarray:
        return self.rot @ np.asarray(p, float) + self.shift

    def box(self, lo: Point, hi: Point, margin: float = 2.0) -> Box | None:
        """Index slices covering the patient-space box [lo, hi] (None when it misses the grid)."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        corners = np.array([[(lo, hi)[(k >> a) & 1][a] for a in range(3)] for k in range(8)])
        w = corners @ self.rot.T + self.shift
        out = []
        for a, axis in enumerate(self.axes):
            i0 = int(np.searchsorted(axis, w[:, a].min() - margin))
            i1 = int(np.searchsorted(axis, w[:, a].max() + margin))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.q[0][sl], self.q[1][sl], self.q[2][sl]

    def bumps(self, sl: Box, centres: np.ndarray, vectors: np.ndarray, sigmas: np.ndarray
              ) -> list[np.ndarray]:
        """Sum of isotropic Gaussian bumps (patient-frame vectors), separable on the world axes."""
        out = [np.zeros([s.stop - s.start for s in sl], np.float32) for _ in range(3)]
        for c, v, s in zip(centres, vectors, sigmas):
            cw = self.world(c)
            g = [np.exp(-0.5 * ((axis[part] - cw[a]) / s) ** 2).astype(np.float32)
                 for a, (axis, part) in enumerate(zip(self.axes, sl))]
            g3 = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
            for a in range(3):
                out[a] += np.float32(v[a]) * g3
        return out


def _paint(tissue: np.ndarray, sl: Box, mask: np.ndarray, cls: int, may: np.ndarray | None = None
           ) -> None:
    view = tissue[sl]
    if may is not None:
        mask = mask & may[view]
    if np.isscalar(cls):
        view[mask] = cls
    else:
        view[mask] = cls[mask]


@dataclass
class Solid:
    """An ellipsoid-based organ: local axes (columns), semi-axes (mm), Gaussian-bump warp."""

    centre: np.ndarray
    axes: np.ndarray
    semi: np.ndarray
    bump_c: np.ndarray
    bump_v: np.ndarray
    bump_s: np.ndarray
    reach: float = 1.2

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.abs(self.axes) @ (self.semi * self.reach) + (
            np.abs(self.bump_v).max() if len(self.bump_v) else 0
        )
        return self.centre - half, self.centre + half

    def z_range(self) -> tuple[float, float]:
        """Lowest and highest z of the ellipsoid (give or take the warp's few mm)."""
        half = float(np.sqrt(((self.axes[2] * self.semi) ** 2).sum()))
        return self.centre[2] - half, self.centre[2] + half

    def local(self, frame: Frame) -> tuple[Box, np.ndarray, np.ndarray, np.ndarray] | None:
        """(slices, u, v, w): the organ's normalised local coordinates on its bounding box."""
        sl = frame.box(*self.extent())
        if sl is None:
            return None
        qx, qy, qz = frame.coords(sl)
        if len(self.bump_v):
            dx, dy, dz = frame.bumps(sl, self.bump_c, self.bump_v, self.bump_s)
            qx, qy, qz = qx - dx, qy - dy, qz - dz
        p = (
            qx - np.float32(self.centre[0]),
            qy - np.float32(self.centre[1]),
            qz - np.float32(self.centre[2]),
        )
        a = self.axes.astype(np.float32)
        return (
            sl,
            *[
                (a[0, k] * p[0] + a[1, k] * p[1] + a[2, k] * p[2]) / np.float32(self.semi[k])
                for k in range(3)
            ],
        )


def _solid(rng: np.random.Generator, centre: Point, axes: np.ndarray, semi: Point,
           n_bumps: int = 5, amp: float = 6.0, reach: float = 1.2) -> Solid:
    centre, semi = np.asarray(centre, float), np.asarray(semi, float)
    dirs = rng.normal(0, 1, (n_bumps, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bump_c = centre + (dirs * semi) @ axes.T
    bump_v = rng.normal(0, amp, (n_bumps, 3))
    bump_s = rng.uniform(0.35, 0.6, n_bumps) * semi.mean()
    return Solid(centre, axes, semi, bump_c, bump_v, bump_s, reach)


@dataclass
class Tube:
    """A polyline of varying radius (patient mm), optionally with a per-vertex gas level."""

    points: np.ndarray  # (n, 3)
    radii: np.ndarray  # (n,)
    # (n,) gas fills the lumen above centre_y + gas * radius (>1: no gas)
    gas: np.ndarray | None = None

    def field(self, frame: Frame, pad: float = 0.0) -> tuple[Box, np.ndarray, np.ndarray] | None:
        """(slices, normalised distance (<1 inside; inf far away), nearest segment index)."""
        lo = (self.points - self.radii[:, None]).min(0) - pad
        hi = (self.points + self.radii[:, None]).max(0) + pad
        sl = frame.box(lo, hi)
        if sl is None:
            return None
        best = np.full(frame.q[0][sl].shape, np.inf, np.float32)
        seg = np.zeros(best.shape, np.int32)
        for i in range(len(self.points) - 1):
            a, b = self.points[i], self.points[i + 1]
            ra, rb = self.radii[i], self.radii[i + 1]
            r = max(ra, rb) + pad
            sub = frame.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
            if sub is None:
                continue
            rel = tuple(
                slice(max(s.start, S.start) - S.start, min(s.stop, S.stop) - S.start)
                for s, S in zip(sub, sl)
            )
            if any(r_.stop <= r_.start for r_ in rel):
                continue
            glob = tuple(slice(S.start + r_.start, S.start + r_.stop) for r_, S in zip(rel, sl))
            qx, qy, qz = frame.coords(glob)
            ab = (b - a).astype(np.float32)
            px, py, pz = qx - np.float32(a[0]), qy - np.float32(a[1]), qz - np.float32(a[2])
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / np.float32(ab @ ab), 0, 1)
            d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
            nd = d / (np.float32(ra) + t * np.float32(rb - ra))
            view, sview = best[rel], seg[rel]
            closer = nd < view
            view[closer] = nd[closer]
            sview[closer] = i
        return sl, best, seg


def _spline(points: np.ndarray | Sequence[Sequence[float]], step: float = 4.0) -> np.ndarray:
    """A smooth curve through control points, resampled every ~step mm."""
    points = np.asarray(points, float)
    s = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    n = max(2, round(s[-1] / step) + 1)
    return CubicSpline(s, points, bc_type="natural")(np.linspace(0, s[-1], n))


def _smooth_field(rng: np.random.Generator, frame: Frame, cell: float = 12.0) -> np.ndarray:
    """A smooth random field (std ~1) on the grid: random nodes every `cell` mm, blended by a
    Gaussian kernel along each world axis."""
    mats = []
    for axis in frame.axes:
        nodes = np.arange(axis[0] - 2 * cell, axis[-1] + 2 * cell, cell)
        w = np.exp(-0.5 * ((axis[:, None] - nodes[None, :]) / (0.75 * cell)) ** 2)
        mats.append((w / np.sqrt((w ** 2).sum(1, keepdims=True))).astype(np.float32))
    low = rng.standard_normal([m.shape[1] for m in mats]).astype(np.float32)
    out = np.tensordot(mats[0], low, axes=(1, 0))
    out = np.tensordot(out, mats[1], axes=(1, 1))
    return np.tensordot(out, mats[2], axes=(1, 1))


# ---------------------------------------------------------------------------------------
# Anatomy, drawn in patient coordinates
# ---------------------------------------------------------------------------------------


class Anatomy:
    """Every structure of one patient (parameters only; painting is `paint`)."""

    def __init__(self, rng: np.random.Generator, lesion: bool, role: str):
        u = rng.uniform

        def jit(sd: float = 6.0, lim: float = 15.0) -> np.ndarray:
            return np.clip(rng.normal(0, sd, 3), -lim, lim)

        def scale(lo: float = 0.9, hi: float = 1.1) -> np.ndarray:
            return u(lo, hi) * u(0.96, 1.04, 3)

        ca, cb = u(106, 124), u(70, 84)
        self.cav = (ca, cb)
        self.waist = (u(-0.03, 0.03), u(0, 2 * math.pi))
        self.fat, self.wall, self.back = u(6, 24), u(7, 12), u(34, 42)
        self.table_gap = u(3, 12)
        self.vb = (u(19, 23), u(15, 17.5))
        self.y_vb = yv = -cb + u(33, 39)
        self.level = (u(31, 36), u(0, 36))
        self.rib = (u(10, 30), u(22, 27))  # lowest rib's posterior z, rib pitch
        vb_front = yv + self.vb[1]

        # liver: a wedge, thick on the right, tapering over the midline
        c = np.array([0.24 * ca, 0.04 * cb, 42.0]) + jit()
        self.liver = _solid(
            rng,
            c,
            _rot(2, u(-6, 6)) @ _rot(1, u(-5, 5)),
            np.array([124, 90, 78]) * scale(),
            n_bumps=6,
            amp=6.0,
        )
        # spleen: a crescent against the left posterolateral wall, hilum facing anteromedially
        c = np.array([-0.76 * ca, -0.28 * cb, 64.0]) + jit()
        out = _unit([c[0] / ca ** 2, c[1] / cb ** 2, 0])
        self.spleen = _solid(
            rng,
            c,
            _axes(out, [0, u(-0.15, 0.15), 1]),
            np.array([24, 60, 52]) * scale(),
            n_bumps=4,
            amp=4.0,
            reach=1.15,
        )
        # kidneys: right a little lower; hilum anteromedial; upper poles medial and posterior
        self.kidneys = {}
        for side, z0 in (("r", 2.0), ("l", 8.0)):
            s = 1.0 if side == "r" else -1.0
            c = np.array([s * 0.58 * ca, yv + u(8, 14), z0]) + jit(5, 12)
            alpha, beta, gamma = (
                math.radians(u(20, 40)),
                math.radians(u(8, 18)),
                math.radians(u(5, 15)),
            )
            axes = _axes(
                [-s * math.cos(alpha), math.sin(alpha), 0],
                [-s * math.sin(beta), -math.sin(gamma), 1],
            )
            self.kidneys[side] = _solid(
                rng, c, axes, np.array([30, 24.5, 58]) * scale(), n_bumps=3, amp=2.5, reach=1.1
            )
        # pancreas: head by the duodenum, neck over the portal confluence, tail at the splenic hilum
        sh, k = jit(5, 12), ca / 117.0
        ctrl = (
            np.array(
                [
                    [46 * k, yv + 44, -6],
                    [38 * k, yv + 52, 8],
                    [14 * k, yv + 62, 18],
                    [-16 * k, yv + 60, 24],
                    [-50 * k, yv + 44, 32],
                    [-78 * k, yv + 24, 38],
                ]
            )
            + sh
            + rng.normal(0, 2.5, (6, 3))
        )
        pts = _spline(ctrl, 5.0)
        r_ctrl = np.array([15, 16, 11.5, 11, 10.5, 9]) * u(0.9, 1.1)
        along = np.linspace(0, 1, len(pts))
        self.pancreas = Tube(pts, np.interp(along, np.linspace(0, 1, 6), r_ctrl))
        head = ctrl[1]

        # vessels
        ax_x, ax_r = -u(8, 16), u(9, 12.5)
        ax_y = vb_front + ax_r + u(1, 4)
        zs = np.array([-200.0, -60, 0, 60, 200])
        self.aorta = Tube(
            np.stack([ax_x - 0.02 * zs, np.full(5, ax_y) + 0.01 * zs, zs], 1), np.full(5, ax_r)
        )
        # organs of the peritoneum stay in front of this, near the midline
        self.prevertebral = ax_y + ax_r + 4
        iv_x, iv_r = u(20, 28), u(10, 12.5)
        iv_y = vb_front + iv_r * 0.8 + u(0, 4)
        zi = np.array([-200.0, 20, 50, 90, 200])
        self.ivc = Tube(
            np.stack(
                [
                    np.full(5, iv_x) + np.maximum(0, zi - 50) * 0.1,
                    iv_y + np.maximum(0, zi - 40) * 0.3,
                    zi,
                ],
                1,
            ),
            np.array([iv_r, iv_r, iv_r * 1.1, iv_r * 1.2, iv_r * 1.2]),
        )
        conf = np.array([12 * k, yv + 47, 12]) + sh
        hilum_l = self.liver.centre + np.array([-0.05 * ca, -0.1 * cb, -20])
        pv = _spline([conf, conf + _mm(12, 4, 14), hilum_l, hilum_l + _mm(25, 5, 25)], 4.0)
        self.portal = Tube(
            pv, np.interp(np.linspace(0, 1, len(pv)), [0, 0.6, 1], [u(6, 8), 6.5, 4.0])
        )
        sv = _spline([conf, *(ctrl[2:5] + _mm(0, -12, 2)), self.spleen.centre - out * 22], 5.0)
        self.splenic_vein = Tube(sv, np.full(len(sv), u(3.5, 5.0)))
        mv = _spline(
            [conf, conf + _mm(4, 10, -50), conf + _mm(8, 14, -100), conf + _mm(10, 10, -180)], 6.0
        )
        self.smv = Tube(mv, np.full(len(mv), u(4, 5.5)))
        sma0 = np.array([ax_x, ax_y + ax_r * 0.8, 20.0])
        sma = _spline([sma0, [2 * k, yv + 52, 2], [4 * k, yv + 56, -45], [6 * k, yv + 58, -120],
                       [6 * k, yv + 58, -200]], 6.0)
        self.sma = Tube(sma, np.full(len(sma), u(3, 4)))
        self.renal = []
        for side, kid in self.kidneys.items():
            hil = kid.centre + kid.axes[:, 0] * kid.semi[0] * 0.95
            ivc_pt = np.array([iv_x, iv_y, hil[2]])
            if side == "r":
                vein = [hil, (hil + ivc_pt) / 2 + [0, 3, 0], ivc_pt]
            else:
                vein = [
                    hil,
                    [ax_x - ax_r - 8, ax_y + ax_r + 5, hil[2] + 4],
                    [ax_x, ax_y + ax_r + 6, hil[2] + 4],
                    ivc_pt,
                ]
            art = [np.array([ax_x + (ax_r if side == "r" else -ax_r) * 0.7, ax_y - 2, hil[2] + 6]),
                   hil + _mm(0, -6, 2)]
            vp, ap = _spline(vein, 4.0), _spline(art, 4.0)
            self.renal.append(
                (Tube(vp, np.full(len(vp), u(4, 6))), Tube(ap, np.full(len(ap), u(2.5, 3.5))))
            )

        # stomach (with the antrum reaching to the pylorus) and gallbladder
        c = np.array([-0.40 * ca, 0.22 * cb, 52.0]) + jit()
        self.stomach = _solid(rng, c, _rot(1, -u(15, 35)) @ _rot(2, u(-10, 10)),
                              np.array([42, 30, 50]) * scale(0.85, 1.15), n_bumps=4, amp=6.0)
        self.stomach_gas = u(-0.2, 0.6)  # air-fluid level, in stomach semi-axes above its centre
        pylorus = np.array([0.15 * ca, 0.45 * cb, 22.0]) + jit(4, 10)
        ant = _spline([c + _mm(10, 8, -22), (c + pylorus) / 2 + [0, 8, -18], pylorus], 5.0)
        self.antrum = Tube(ant, np.linspace(u(20, 26), u(11, 14), len(ant)))
        self.gallbladder = None
        if rng.random() < 0.85:
            c = np.array([0.30 * ca, 0.42 * cb, 10.0]) + jit(4, 10)
            ax = _axes([1, 0, 0], [u(-0.2, 0.2), -u(0.3, 0.7), 1])
            self.gallbladder = _solid(
                rng, c, ax, np.array([14, 15, 34]) * scale(0.8, 1.2), n_bumps=2, amp=3.0
            )

        # duodenum: a C around the pancreatic head
        d = _spline(
            [
                pylorus,
                head + _mm(20, 22, 10),
                head + _mm(28, 4, -8),
                head + _mm(24, -2, -30),
                head + _mm(0, 0, -42),
                head + _mm(-40, 6, -40),
                head + _mm(-60, 10, -28),
            ],
            5.0,
        )
        self.duodenum = Tube(d, np.full(len(d), u(10, 13)), self._gas_levels(rng, len(d), 0.4))
        # colon around the periphery, with haustra
        col = np.array(
            [
                [0.70, 0.15, -80],
                [0.74, 0.05, -30],
                [0.66, 0.35, 2],
                [0.25, 0.72, -8],
                [-0.30, 0.70, 0],
                [-0.68, 0.30, 38],
                [-0.80, -0.05, 5],
                [-0.76, 0.0, -80],
            ]
        ) * [ca, cb, 1]
        col += rng.normal(0, 4, col.shape)
        cp = _spline(col, 4.0)
        s = np.arange(len(cp)) * 4.0
        r0 = u(17, 23)
        haustra = 1 + 0.12 * np.cos(2 * math.pi * s / u(20, 28))
        self.colon = Tube(cp, r0 * haustra, self._gas_levels(rng, len(cp), 0.6))
        # small bowel: a smoothed random walk in the lower and central abdomen
        p, d = np.array([u(-40, 40), u(0.15, 0.5) * cb, u(-60, -25)]), _unit(rng.normal(0, 1, 3))
        walk = [p]
        for _ in range(70):
            d = _unit(d + rng.normal(0, 0.55, 3))
            nxt = p + 9 * d
            if (nxt[0] / (0.62 * ca)) ** 2 + (
                (nxt[1] - 0.3 * cb) / (0.6 * cb)
            ) ** 2 > 1 or not -110 < nxt[2] < 0:
                d = _unit(np.array([0, 0.3 * cb, -50]) - p + rng.normal(0, 10, 3))
                nxt = p + 9 * d
            p = nxt
            walk.append(p)
        sb = _spline(np.array(walk), 4.0)
        self.small_bowel = Tube(
            sb, np.full(len(sb), u(10, 13)), self._gas_levels(rng, len(sb), 0.3)
        )
        self.oral_contrast = rng.random() < (0.25 if role != "kidneys" else 0.1)

        # diaphragm domes just above the liver and spleen; heart above the left dome
        self.dome_r = self.liver.z_range()[1] + u(-6, 2)
        self.dome_l = max(self.dome_r - u(8, 16), self.spleen.z_range()[1] + 6)

        # tumours (labelled), drawn whatever the archive so the streams stay aligned
        self.lesions = []
        n_liver = int(rng.integers(1, 4))
        liver_pts = []
        while len(liver_pts) < n_liver:
            lu = np.array([u(-0.1, 0.6), u(-0.45, 0.45), u(-0.35, 0.4)])
            if _liver_shape(*lu) < 0.45:
                liver_pts.append(self.liver.centre + self.liver.axes @ (lu * self.liver.semi))
        liver_r = rng.uniform(7, 22, n_liver)
        pi = int(rng.integers(0, int(0.6 * len(pts))))
        kid_side = "r" if rng.random() < 0.5 else "l"
        kid = self.kidneys[kid_side]
        dk = _unit([u(-1, 0.3), u(-1, 1), u(-1, 1)])
        kid_pt = kid.centre + kid.axes @ (0.85 * dk * kid.semi)
        kid_r = u(10, 18)
        panc_r = u(8, 14)
        if lesion and role == "liver":
            self.lesions = [("liver", p_, r_) for p_, r_ in zip(liver_pts, liver_r)]
        elif lesion and role == "pancreas":
            self.lesions = [("pancreas", pts[pi], panc_r)]
        elif lesion and role == "kidneys":
            self.lesions = [(f"kidney_{kid_side}", kid_pt, kid_r)]

    @staticmethod
    def _gas_levels(rng: np.random.Generator, n: int, p_gas: float) -> np.ndarray:
        """Per-vertex gas level along a gut tube: runs of gas (level in radii above the centre
        line)."""
        smooth = np.convolve(rng.normal(0, 1, n + 16), np.ones(9) / 3, mode="same")[8:8 + n]
        level = rng.uniform(-0.3, 0.5)
        return np.where(smooth > np.quantile(smooth, 1 - p_gas), level, 9.0)

    def z_span(self) -> tuple[float, float]:
        """Lowest and highest z of the labelled organs."""
        solids = [self.liver, self.spleen, *self.kidneys.values()]
        bottom = min(s.z_range()[0] for s in solids)
        bottom = min(bottom, float((self.pancreas.points[:, 2] - self.pancreas.radii).min()))
        return bottom, max(self.dome_r, *(s.z_range()[1] for s in solids))


def _liver_shape(u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The liver's wedge in its normalised local coordinates (<1 inside): full height and depth on
    the right (+u), thinning towards the left lobe."""
    s = np.clip((u + 1.0) / 1.5, 0, 1)
    s = s * s * (3 - 2 * s)
    return u * u + ((v - 0.5 * (1 - s)) / (0.3 + 0.7 * s)) ** 2 + (w / (0.22 + 0.78 * s)) ** 2


# ---------------------------------------------------------------------------------------
# Painting the tissue map
# ---------------------------------------------------------------------------------------


def _ellipse(qx: np.ndarray, qy: np.ndarray, a: float, ant: float, post: float) -> np.ndarray:
    """Normalised squared radius of an ellipse whose anterior and posterior half-depths differ."""
    return (qx / a) ** 2 + np.where(qy >= 0, qy / ant, qy / post) ** 2


def _gut(tissue: np.ndarray, frame: Frame, tube: Tube, wall: float, content_cls: int,
         may: np.ndarray) -> None:
    got = tube.field(frame)
    if got is None:
        return
    sl, nd, seg = got
    _paint(
        tissue,
        sl,
        nd < 1,
        T["bowel_wall"] if content_cls != T["stomach_content"] else T["stomach_wall"],
        may,
    )
    r = tube.radii[seg]
    lumen = nd < 1 - wall / r
    cls = np.full(nd.shape, content_cls, np.uint8)
    if tube.gas is not None:
        qy = frame.coords(sl)[1]
        gas = qy > tube.points[seg, 1] + tube.gas[seg] * r
        cls[gas] = T["stomach_gas"] if content_cls == T["stomach_content"] else T["bowel_gas"]
    _paint(tissue, sl, lumen, cls, _may("bowel_wall", "stomach_wall") | may)


def paint(an: Anatomy, frame: Frame) -> np.ndarray:
    """The tissue-class map of the anatomy on the frame's grid."""
    tissue = np.zeros(frame.shape, np.uint8)
    qx, qy, qz = frame.q
    ca0, cb = an.cav
    everywhere = (slice(None),) * 3

    # the table: a carbon-fibre sandwich, flat in the scanner (world) frame
    y_world = frame.axes[1]
    top = frame.shift[1] - (cb + an.back + 0.5 * an.fat + 2) - an.table_gap
    for lo, hi, cls in ((top - 2.5, top, "table_shell"), (top - 17.5, top - 2.5, "table_foam"),
                        (top - 20, top - 17.5, "table_shell")):
        rows = (y_world >= lo) & (y_world < hi)
        tissue[:, rows, :] = T[cls]

    # body: skin, subcutaneous fat, muscle envelope, abdominal cavity
    ca = ca0 * (1 + an.waist[0] * np.sin(qz / 80 + an.waist[1]))
    outer = (ca + an.wall + an.fat + 2, cb + an.wall + an.fat + 2, cb + an.back + 0.5 * an.fat + 2)
    layers = (("skin", 0.0), ("fat", 2.0))
    for cls, inset in layers:
        m = _ellipse(qx, qy, outer[0] - inset, outer[1] - inset, outer[2] - inset) < 1
        _paint(tissue, everywhere, m, T[cls])
    _paint(
        tissue,
        everywhere,
        _ellipse(qx, qy, ca + an.wall, cb + an.wall, cb + an.back) < 1,
        T["muscle"],
    )
    rho = _ellipse(qx, qy, ca, cb, cb)
    _paint(tissue, everywhere, rho < 1, T["visceral_fat"])
    del outer

    # ribs in the wall band of the upper abdomen (sloping down anteriorly; none over the anterior
    # midline)
    band = (rho >= 1) & (rho < (1 + 8 / ca) ** 2) & ~((qy > 0.2 * cb) & (np.abs(qx) < 0.5 * ca))
    zr = qz + 0.4 * (qy + cb) - an.rib[0]
    ribs = (
        band
        & (zr > 0)
        & (qz > an.rib[0] - 45)
        & (np.abs(np.mod(zr, an.rib[1]) - an.rib[1] / 2) < 3.5)
    )
    _paint(tissue, everywhere, ribs, T["rib"], ANY_BODY)
    del band, zr, ribs

    # lungs above the diaphragm domes, the heart over the left dome
    lx, ly = an.liver.centre[0] + 0.3 * an.liver.semi[0], an.liver.centre[1]
    sx, sy = 0.75 * an.spleen.centre[0], 0.5 * an.spleen.centre[1]
    z_dia = np.maximum(an.dome_r - 0.005 * (qx - lx) ** 2 - 0.008 * (qy - ly) ** 2,
                       an.dome_l - 0.005 * (qx - sx) ** 2 - 0.008 * (qy - sy) ** 2)
    chest = (rho < 1) & (qz > z_dia)
    _paint(tissue, everywhere, chest, T["lung"])
    heart = ((qx + 15) / 70) ** 2 + ((qy - 0.35 * cb) / 55) ** 2 + (
        (qz - an.dome_l - 55) / 65
    ) ** 2 < 1
    _paint(tissue, everywhere, chest & heart, T["heart"])
    del z_dia, chest, heart, rho, ca

    # psoas (growing inferiorly) and paraspinal muscles; spine
    va, vb = an.vb
    sl = frame.box([-va - 60, an.y_vb - 120, -1e4], [va + 60, an.y_vb + 35, 1e4])
    x, y, z = frame.coords(sl)
    grow = 1 - 0.002 * z
    r_ps = np.clip(5 + 0.13 * (40 - z), 0, 20)
    for s in (1, -1):
        psoas = ((x - s * (va + 6 + r_ps * 0.9)) ** 2 + (y - an.y_vb - 2) ** 2 < r_ps**2) & (z < 40)
        _paint(tissue, sl, psoas, T["muscle"], ANY_BODY)
    canal_y = an.y_vb - vb - 10
    zz = np.mod(z - an.level[1], an.level[0])
    h = an.level[0]
    r2 = (x / (va * grow)) ** 2 + ((y - an.y_vb) / (vb * grow)) ** 2
    disc = zz > h - 8
    _paint(
        tissue, sl, r2 < 1, np.where(disc, T["disc"], T["bone_cortex"]).astype(np.uint8), ANY_BODY
    )
    _paint(tissue, sl, (r2 < (1 - 2.5 / vb) ** 2) & ~disc, T["bone_marrow"], ANY_BODY)
    rc = np.sqrt(x ** 2 + (y - canal_y) ** 2)
    arch = (rc < 16) & (y < canal_y + 5) & (zz < h - 6)
    spinous = (np.abs(x) < 4) & (y < canal_y) & (y > canal_y - 42) & (zz > 4) & (zz < h - 10)
    transverse = (
        (np.abs(y - canal_y - 3) < 5) & (np.abs(x) > 12) & (np.abs(x) < 48) & (zz > 6) & (zz < 17)
    )
    _paint(tissue, sl, arch | spinous | transverse, T["rib"], ANY_BODY)
    _paint(tissue, sl, rc < 9.5, T["csf"], ANY_BODY)

    # gut: colon, small bowel, duodenum, stomach (organs push them aside afterwards)
    gut = _may("visceral_fat", *_GUT)
    _gut(tissue, frame, an.colon, 2.5, T["stool"], _may("visceral_fat"))
    _gut(
        tissue,
        frame,
        an.small_bowel,
        2.5,
        T["oral_contrast"] if an.oral_contrast else T["bowel_fluid"],
        gut,
    )
    _gut(tissue, frame, an.duodenum, 2.5, T["bowel_fluid"], gut)
    got = an.stomach.local(frame)
    if got is not None:
        sl, u, v, w = got
        rr = u * u + v * v + w * w
        _paint(tissue, sl, rr < 1, T["stomach_wall"], gut)
        qy_ = frame.coords(sl)[1]
        level = an.stomach.centre[1] + an.stomach_gas * an.stomach.semi[1]
        content = np.where(qy_ > level, T["stomach_gas"], T["stomach_content"]).astype(np.uint8)
        _paint(tissue, sl, rr < (1 - 4 / an.stomach.semi.min()) ** 2, content, _may("stomach_wall"))
    _gut(
        tissue, frame, Tube(an.antrum.points, an.antrum.radii, None), 4.0, T["stomach_content"], gut
    )

    # solid organs: kidneys, pancreas, spleen, liver (the first painted keeps a contested voxel)
    for side, kid in an.kidneys.items():
        got = kid.local(frame)
        if got is None:
            continue
        sl, u, v, w = got
        rr = u * u + v * v + w * w
        notch = ((u - 0.95) / 0.55) ** 2 + (v / 0.5) ** 2 + (w / 0.42) ** 2 < 1
        theta = np.arctan2(w, u - 0.6)
        medulla = rr < (0.74 + 0.08 * np.cos(7 * theta)) ** 2
        cls = np.where(medulla, T[f"kidney_{side}_medulla"], T[f"kidney_{side}_cortex"]).astype(
            np.uint8
        )
        cls[notch] = T["renal_sinus"]
        _paint(tissue, sl, rr < 1, cls, SOFT)
    got = an.pancreas.field(frame)
    if got is not None:
        sl, nd, _ = got
        _paint(tissue, sl, nd < 1, T["pancreas"], SOFT)
    got = an.spleen.local(frame)
    if got is not None:
        sl, u, v, w = got
        u = u + 0.7 * v * v + 0.3 * w * w  # bent along the wall: convex outwards, hilum concave
        crescent = (u * u + v * v + w * w < 1) & (
            ((u + 1.5) / 1.0) ** 2 + (v / 0.8) ** 2 + (w / 0.75) ** 2 >= 1
        )
        _paint(tissue, sl, crescent, T["spleen"], SOFT)
    got = an.liver.local(frame)
    if got is not None:
        sl, u, v, w = got
        x, y, _ = frame.coords(sl)  # the liver stays in front of the aorta and the spine
        behind = ((x + 5) / 45) ** 2 + ((y - an.y_vb) / (an.prevertebral - an.y_vb)) ** 2 < 1
        _paint(tissue, sl, (_liver_shape(u, v, w) < 1) & ~behind, T["liver"], SOFT)

    # vessels (they cut through organs, as the IVC through the liver and the veins behind the
    # pancreas)
    for tube, cls, may in (
        (an.aorta, "aorta", ANY_BODY),
        (an.ivc, "ivc", VESSEL | _may("muscle")),
        (an.portal, "portal_vein", VESSEL),
        (an.splenic_vein, "splenic_vein", VESSEL),
        (an.smv, "mesenteric_vessel", VESSEL),
        (an.sma, "mesenteric_vessel", VESSEL),
    ):
        got = tube.field(frame)
        if got is not None:
            sl, nd, _ = got
            _paint(
                tissue,
                sl,
                nd < 1,
                T[cls],
                may & ~_may("bone_cortex", "bone_marrow", "disc", "csf", "rib"),
            )
    for vein, artery in an.renal:
        for tube, cls in ((vein, "renal_vein"), (artery, "renal_artery")):
            got = tube.field(frame)
            if got is not None:
                sl, nd, _ = got
                _paint(tissue, sl, nd < 1, T[cls], _may("visceral_fat", *_GUT, "renal_sinus"))
    if an.gallbladder is not None:
        got = an.gallbladder.local(frame)
        if got is not None:
            sl, u, v, w = got
            _paint(
                tissue,
                sl,
                u * u + v * v + w * w < 1,
                T["gallbladder"],
                _may("liver", "visceral_fat", *_GUT),
            )

    # tumours: inside the liver and pancreas; kidney tumours may bulge out of the kidney
    for organ, centre, radius in an.lesions:
        r = np.full(2, radius)
        got = Tube(np.stack([centre, centre + _mm(0, 0, 0.01)]), r).field(frame)
        if got is None:
            continue
        sl, nd, _ = got
        if organ == "liver":
            _paint(tissue, sl, nd < 1, T["liver_lesion"], _may("liver"))
        elif organ == "pancreas":
            _paint(tissue, sl, nd < 1, T["pancreas_lesion"], _may("pancreas"))
        else:
            side = organ[-1]
            may = _may(
                f"kidney_{side}_cortex",
                f"kidney_{side}_medulla",
                "renal_sinus",
                "visceral_fat",
                *_GUT,
            )
            _paint(tissue, sl, nd < 1, T[f"kidney_{side}_lesion"], may)
    return tissue


# ---------------------------------------------------------------------------------------
# One scan: acquisition, intensities, partial volume, noise
# ---------------------------------------------------------------------------------------


def _streams(seed: int, role: str, index: int) -> list[np.random.Generator]:
    ss = np.random.SeedSequence([seed, ROLES.index(role), index, 0x5E6])
    return [np.random.default_rng(s) for s in ss.spawn(4)]


def render(role: str, index: int, seed: int = 0, coarsen: float = 2.5) -> dict:
    """One case of an archive: RAS-ordered image (HU) and label arrays, their RAS affine, and facts.
    """
    arch = ARCHIVES[role]
    r_anat, r_acq, r_tex, r_noise = _streams(seed, role, index)
    lesion = r_acq.random() < arch.lesion
    an = Anatomy(r_anat, lesion, role)

    # acquisition: spacing, slice thickness, pose on the table, field of view
    dxy = r_acq.uniform(*arch.inplane) * coarsen
    thick = float(r_acq.choice([s for s, _ in arch.slices], p=[p for _, p in arch.slices]))
    codes = str(r_acq.choice(arch.codes))
    noise = r_acq.uniform(*arch.noise)
    rot = (
        _rot(2, r_acq.uniform(-4, 4))
        @ _rot(0, r_acq.uniform(-2, 2))
        @ _rot(1, r_acq.uniform(-2, 2))
    )
    shift = np.array([r_acq.uniform(-12, 12), r_acq.uniform(-15, 15), r_acq.uniform(-700, -300)])
    ca, cb = an.cav
    half_x = (ca * 1.03 + an.wall + an.fat + 2) * 1.01 + 0.08 * cb
    front = cb + an.wall + an.fat + 2
    table = cb + an.back + 0.5 * an.fat + 2 + an.table_gap + r_acq.uniform(1, 6)  # into the table
    x0, x1 = shift[0] - half_x - r_acq.uniform(0, 6), shift[0] + half_x + r_acq.uniform(0, 6)
    y0, y1 = shift[1] - table, shift[1] + front + r_acq.uniform(0, 6)
    zb, zt = an.z_span()
    z0, z1 = shift[2] + zb - r_acq.uniform(2, 8), shift[2] + zt + r_acq.uniform(2, 8)
    nx, ny, nz = (
        max(8, round((b - a) / s)) for a, b, s in ((x0, x1, dxy), (y0, y1, dxy), (z0, z1, thick))
    )
    x = x0 + (np.arange(nx) + 0.5) * dxy
    y = y0 + (np.arange(ny) + 0.5) * dxy
    z = z0 + (np.arange(nz) + 0.5) * thick
    sub = max(1, round(thick / 1.6))  # sub-slices averaged into one slice: the slice profile
    zs = (z[:, None] + ((np.arange(sub) + 0.5) / sub - 0.5)[None, :] * thick).ravel()
    frame = Frame(x, y, zs, rot, shift)

    tissue = paint(an, frame)

    # intensities: the phase's table, shifted per case, with texture and organ-specific patterns
    table_hu = PHASES[arch.phase]
    base = np.array([table_hu[n][0] for n in TISSUES], np.float32)
    amp = np.array([table_hu[n][1] for n in TISSUES], np.float32)
    shifts = r_tex.uniform(-SHIFT_HU, SHIFT_HU, len(TISSUES)).astype(np.float32)
    shifts[[T[n] for n in _UNSHIFTED]] = 0
    base += shifts
    tex = _smooth_field(r_tex, frame, 12.0)
    hu = base[tissue] + amp[tissue] * tex
    qx, qy = frame.q[0], frame.q[1]
    stool = tissue == T["stool"]  # mottled: gas bubbles in faeces
    hu[stool] = np.where(_smooth_field(r_tex, frame, 5.0)[stool] > 1.0, -950.0, hu[stool])
    if arch.phase == "arterial":  # the spleen's arterial-phase moire
        spl = tissue == T["spleen"]
        ang = r_tex.uniform(0, math.pi)
        hu[spl] += 35 * np.sin(
            0.18 * (qx[spl] * math.cos(ang) + qy[spl] * math.sin(ang)) + 2.5 * tex[spl]
        )
    del tex, stool

    # partial volume: average the sub-slices, blur in plane (the scanner's point spread)
    hu = hu.reshape(nx, ny, nz, sub).mean(axis=3, dtype=np.float32)
    hu = ndimage.gaussian_filter(hu, (0.5, 0.5, 0), mode="nearest")
    # noise: correlated in plane as reconstructed CT noise is
    n = r_noise.standard_normal(hu.shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, (0.6, 0.6, 0), mode="wrap")
    # `noise` is the archive's at its own spacing: averaging coarsen x coarsen pixels divides it by
    # coarsen
    hu += n * np.float32(noise / coarsen / max(float(n.std()), 1e-6))
    del n
    hu = np.clip(np.round(hu), -1024, 3071)
    image = hu.astype(arch.dtype)
    label = LABELS[role][tissue[:, :, sub // 2::sub]]
    affine = np.diag([dxy, dxy, thick, 1.0])
    affine[:3, 3] = [x[0], y[0], z[0]]
    facts = {
        "phase": arch.phase,
        "spacing_mm": [round(dxy, 4), round(dxy, 4), thick],
        "shape_ras": [nx, ny, nz],
        "stored_axes": codes,
        "noise_hu": round(noise, 1),
        "lesion": bool(an.lesions),
        "oral_contrast": bool(an.oral_contrast),
        "gallbladder": an.gallbladder is not None,
    }
    return {"image": image, "label": label, "affine": affine, "codes": codes, "facts": facts}


def volumes_ml(label: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    voxel = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    values, counts = np.unique(label, return_counts=True)
    return {str(int(v)): round(float(c) * voxel, 1) for v, c in zip(values, counts) if v != 0}


# ---------------------------------------------------------------------------------------
# Writing the archives
# ---------------------------------------------------------------------------------------


def _stored(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """RAS-ordered data and affine -> the same volume in the archive's array order."""
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.axcodes2ornt(tuple(codes)))
    out = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
    return out, affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)


def _save(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(img, path)


def _paths(out: str, role: str, name: str) -> tuple[str, str]:
    base = os.path.join(out, ARCHIVES[role].folder)
    if role == "kidneys":
        return os.path.join(base, name, "imaging.nii.gz"), os.path.join(
            base, name, "segmentation.nii.gz"
        )
    if role == "test":
        return (os.path.join(base, "img", name + ".nii.gz"),
                os.path.join(base, "label", "label" + name[len("img"):] + ".nii.gz"))
    return os.path.join(base, "imagesTr", name + ".nii.gz"), os.path.join(
        base, "labelsTr", name + ".nii.gz"
    )


def _dataset_json(out: str, role: str, names: list[str]) -> None:
    task = ARCHIVES[role].folder
    meta = {
        "name": task.split("_", 1)[1],
        "description": f"synthetic stand-in for MSD {task} (realdata/synth.py)",
        "reference": "none: synthetic",
        "licence": "CC0",
        "release": "synthetic",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABEL_NAMES[role],
        "numTraining": len(names),
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names
        ],
        "test": [],
    }
    with open(os.path.join(out, task, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=4)


def _size(paths: Sequence[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def generate(out: str, cases: int = 8, test_cases: int = 8, seed: int = 0, coarsen: float = 2.5,
             roles: Sequence[str] = ROLES, log: Callable[[str], None] = print) -> dict:
    """Write the archives of `roles` under `out`; return the manifest (also written to out)."""
    os.makedirs(out, exist_ok=True)
    manifest = {"generator": "realdata/synth.py", "seed": seed, "coarsen": coarsen, "datasets": {}}
    t_all = time.perf_counter()
    for role in roles:
        t0 = time.perf_counter()
        n = test_cases if role == "test" else cases
        names, files, records = [], [], []
        for i in range(n):
            name = case_name(role, i)
            case = render(role, i, seed, coarsen)
            image_path, label_path = _paths(out, role, name)
            img, aff = _stored(case["image"], case["affine"], case["codes"])
            lab, _ = _stored(case["label"], case["affine"], case["codes"])
            _save(image_path, img, aff)
            _save(label_path, lab, aff)
            names.append(name)
            files += [image_path, label_path]
            records.append(
                {
                    "name": name,
                    **case["facts"],
                    "volumes_ml": volumes_ml(case["label"], case["affine"]),
                    "mb": round(_size([image_path, label_path]) / 1e6, 2),
                }
            )
        if role in ("liver", "spleen", "pancreas"):
            _dataset_json(out, role, names)
        secs = time.perf_counter() - t0
        manifest["datasets"][role] = {"folder": ARCHIVES[role].folder, "labels": LABEL_NAMES[role],
                                      "cases": records, "seconds": round(secs, 1)}
        log(f"{ARCHIVES[role].folder}: {n} case(s), {_size(files) / 1e6:.1f} MB, {secs:.1f} s")
    manifest["seconds"] = round(time.perf_counter() - t_all, 1)
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m realdata synth", description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT", help="folder to write the five archives into")
    p.add_argument("--cases", type=int, default=8, help="training cases per site (default 8)")
    p.add_argument("--test-cases", type=int, default=8, help="BTCV test cases (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--coarsen",
        type=float,
        default=2.5,
        help="in-plane spacing = the archive's times this (default 2.5; 1 = native, large files)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT, replacing the archives this script writes there",
    )
    args = p.parse_args(argv)
    if not 1 <= args.cases <= 500:
        p.error(f"--cases {args.cases}: must be between 1 and 500")
    if not 1 <= args.test_cases <= 500:
        p.error(f"--test-cases {args.test_cases}: must be between 1 and 500")
    if args.seed < 0:
        p.error(f"--seed {args.seed}: must be non-negative")
    if not (math.isfinite(args.coarsen) and 1.0 <= args.coarsen <= 4.0):
        p.error(f"--coarsen {args.coarsen}: must be between 1 and 4")
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        p.error(f"{out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not args.overwrite:
            p.error(
                f"{out}: exists and is not empty (pass --overwrite to replace the synthetic "
                "archives in it)"
            )
        for name in (*TOP_FOLDERS, MANIFEST):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    print(
        f"writing a synthetic federation (seed {args.seed}, coarsen {args.coarsen:g}) to {out}",
        flush=True,
    )
    m = generate(out, args.cases, args.test_cases, args.seed, args.coarsen,
                 log=lambda s: print(s, flush=True))
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"done: {total / 1e6:.1f} MB in {m['seconds']:.1f} s; "
          f"train with: python train.py --data-root {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
