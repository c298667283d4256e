"""The data vocabulary every part of SegViz speaks: the organs and the sites that labelled them,
the intensity windows, the `Case` record, and `DataError`.

Arrays are indexed (x, y, z) in RAS order throughout: x grows towards the patient's right, y
towards anterior, z towards superior. This module knows nothing of models or of where cases
come from (cases.py: the built-in phantom, or real data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ORGANS = ("liver", "spleen", "pancreas", "kidneys")
ORGAN_ID = {name: i + 1 for i, name in enumerate(ORGANS)}  # ids of the multi-organ label maps
# the federation of each size: sites are added in this order (the paper's 2, 3 and 4 nodes)
NODE_SITES = {1: ("liver",), 2: ("liver", "spleen"), 3: ("liver", "spleen", "pancreas"),
              4: ("liver", "spleen", "pancreas", "kidneys")}
# which organ each site labelled
SITE_ORGAN = {"liver": "liver", "spleen": "spleen", "pancreas": "pancreas", "kidneys": "kidneys"}
# the colour each organ is shown in (RGB in [0, 1]): the figures' overlays and curves, and the
# colour tables written beside predictions for 3D Slicer and ITK-SNAP
ORGAN_COLOURS = {
    "liver": (0.85, 0.35, 0.2),
    "spleen": (0.2, 0.5, 0.9),
    "pancreas": (0.95, 0.8, 0.2),
    "kidneys": (0.3, 0.8, 0.4),
}

# Intensity windows of the original SegViz code, in HU, each scaled to [0, 1]: one per site's
# binary model, and "pooled" for its multi-class central model.
WINDOWS = {"liver": (-200.0, 200.0), "spleen": (-57.0, 164.0), "pancreas": (-87.0, 199.0),
           "kidneys": (-79.0, 304.0), "pooled": (-200.0, 304.0)}


def site_windows(sites: Sequence[str], binary: bool) -> dict[str, tuple[float, float]]:
    """The HU window of each site's model, in training, validation and test alike.

    A binary site model sees its own site's window, as the original's heads were trained and
    tested. A multi-class model sees one window everywhere: the original's central model used
    -200..304 HU."""
    return {s: WINDOWS[s] for s in sites} if binary else dict.fromkeys(sites, WINDOWS["pooled"])


def window(hu: torch.Tensor, lo_hi: tuple[float, float]) -> torch.Tensor:
    """Clip HU to [lo, hi] and scale to [0, 1] (in place: pass a copy to keep the HU)."""
    lo, hi = lo_hi
    return ((hu - lo) / (hi - lo)).clamp_(0.0, 1.0)


def body_box(
    hu: torch.Tensor, threshold: float = -500.0, margin: int = 2
) -> tuple[slice, slice, slice]:
    """Bounding box of the voxels above `threshold` HU (the body), plus a margin."""
    inside = hu > threshold
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = torch.nonzero(inside.any(dim=other)).flatten()
        lo = max(0, int(idx[0]) - margin) if len(idx) else 0
        hi = min(hu.shape[axis], int(idx[-1]) + margin + 1) if len(idx) else hu.shape[axis]
        box.append(slice(lo, hi))
    return tuple(box)


@dataclass
class Case:
    """One preprocessed volume on the working grid: HU image and organ labels (ORGAN_ID)."""

    name: str
    hu: torch.Tensor  # float32 (x, y, z)
    label: torch.Tensor  # uint8 (x, y, z): 0 background, ORGAN_ID[organ] where labelled
    spacing: tuple[float, float, float]
    geometry: dict | None = None  # real scans: how to put a prediction back on the original grid


class DataError(ValueError):
    """Bad input data; the message names the file or folder and the problem."""
