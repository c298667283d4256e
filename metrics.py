"""The metrics a segmentation is scored by: Dice, and the surface metrics HD95 and normalised
surface Dice (NSD), in millimetres.

Dice: an empty prediction against an empty truth scores 1 (MONAI's DiceMetric with
ignore_empty=False; its default leaves such a case out), exactly one empty scores 0.
`label_dice` gives every organ's Dice of two label maps from one confusion count.

`hd95` and `surface_dice` give, for one pair of binary masks, the numbers MONAI's
`compute_hausdorff_distance(percentile=95, distance_metric="euclidean", directed=False)` and
`compute_surface_dice(class_thresholds=[tol], use_subvoxels=False)` give, using scipy only. A
mask's surface is its foreground voxels that a 6-connected binary erosion removes; distances are
exact Euclidean distances between surface voxel centres in mm, each axis scaled by its voxel
spacing (anisotropic CT: pass the spacing in the same axis order as the array).
`surface_distances` plus `hd95_from_distances` and `surface_dice_from_distances` let a caller
compute both metrics from one pass over the surfaces.

Empty masks follow MONAI 1.6.1 exactly:
    both empty:        hd95 nan, surface_dice nan
    exactly one empty: hd95 nan, surface_dice 0.0
MONAI assigns every surface voxel of the non-empty mask an infinite distance. For NSD none of
them is within the tolerance, so the score is 0. For HD95 the linearly interpolated 95th
percentile of all-infinite distances is inf - inf = nan (torch.quantile and np.percentile
alike); the plain maximum Hausdorff distance would be inf, which is what MONAI's own tests check.
A nan-skipping mean over cases therefore drops missed organs from HD95: count them separately.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import KDTree

METRICS = ("dice", "hd95", "nsd")
# normalised surface Dice: a surface voxel within 2 mm of the other surface counts
NSD_TOLERANCE_MM = 2.0

Mask = np.ndarray | torch.Tensor
Spacing = float | Sequence[float]


# ---------------------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------------------


def dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Dice of two boolean masks; 1 when both are empty, 0 when exactly one is."""
    p, t = pred.bool(), truth.bool()
    ps, ts = int(p.sum()), int(t.sum())
    if ps == 0 and ts == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / (ps + ts)


def label_dice(pred: torch.Tensor, truth: torch.Tensor, classes: int) -> list[float]:
    """Dice of labels 1..classes between two integer label maps, from one confusion count.

    One pass over the voxels instead of one per organ (what `dice` on each organ's masks
    does); the same values, with the same empty-mask rule.
    """
    n = classes + 1
    if min(int(pred.min()), int(truth.min())) < 0 or max(int(pred.max()), int(truth.max())) >= n:
        raise ValueError(f"label_dice: labels must lie in 0..{classes}")
    # uint8 halves the memory traffic of int16 and is the fastest bincount input
    dtype = torch.uint8 if n * n <= 256 else torch.int64
    joint = pred.reshape(-1).to(dtype) * n + truth.reshape(-1).to(dtype)
    confusion = torch.bincount(joint, minlength=n * n).reshape(n, n).cpu()
    hits, predicted, true = confusion.diag(), confusion.sum(1), confusion.sum(0)
    return [1.0 if predicted[c] + true[c] == 0 else 2.0 * int(hits[c]) / int(predicted[c] + true[c])
            for c in range(1, n)]


# ---------------------------------------------------------------------------------------
# Surface metrics
# ---------------------------------------------------------------------------------------


def _as_bool_array(mask: Mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool, copy=False)


def _spacing_mm(spacing: Spacing, ndim: int) -> np.ndarray:
    if isinstance(spacing, numbers.Real):
        return np.full(ndim, float(spacing))
    mm = np.asarray(spacing, dtype=np.float64)
    if mm.shape != (ndim,):
        raise ValueError(f"spacing has {mm.size} values for a {ndim}-D mask")
    return mm


def _bounding_box(union: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Slices of the box around the foreground of a non-empty mask, `margin` voxels wider, clipped
    to the array."""
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=others))
        box.append(
            slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + margin + 1, union.shape[axis]))
        )
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    # MONAI's get_mask_edges without subvoxels: scipy's default (6-connected) erosion, outside the
    # array counted as background, so a mask touching the array border has a surface there too.
    return mask & ~ndimage.binary_erosion(mask)


def _nearest_distances(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Distance from each point of `source` (n, d) to its nearest point of `target` (m, d)."""
    # A KD-tree over the surface points, as MONAI uses on a CPU: its cost follows the number of
    # surface voxels, where a distance transform's follows the box volume, which one stray voxel
    # far from the organ can blow up to the whole scan. leafsize=32 is MONAI's choice for one query.
    return KDTree(target, leafsize=32).query(source, k=1)[0]


def surface_distances(pred: Mask, truth: Mask, spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of `pred` to the nearest one of `truth`, and from
    `truth` to `pred`.

    As in MONAI: if exactly one mask is empty, both arrays hold inf once per surface voxel of the
    other; if both are empty, both arrays are empty.
    """
    p, t = _as_bool_array(pred), _as_bool_array(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} and {t.shape}")
    mm = _spacing_mm(spacing, p.ndim)
    union = p | t
    if not union.any():
        return np.empty(0), np.empty(0)
    # An organ fills a few percent of a CT, so erode and scan only the joint box: every surface
    # voxel of either mask lies in it, and the margin keeps each one's outer neighbour in it too.
    box = _bounding_box(union)
    p_edges, t_edges = _surface(p[box]), _surface(t[box])
    if not (p_edges.any() and t_edges.any()):
        unmatched = np.full(int(p_edges.sum() + t_edges.sum()), np.inf)
        return unmatched, unmatched.copy()
    # Coordinates in mm relative to the box: its offset cancels in every difference.
    p_points, t_points = np.argwhere(p_edges) * mm, np.argwhere(t_edges) * mm
    return _nearest_distances(p_points, t_points), _nearest_distances(t_points, p_points)


def hd95_from_distances(pred_to_truth: np.ndarray, truth_to_pred: np.ndarray) -> float:
    """Larger of the two directed 95th percentiles (linear interpolation, as torch.quantile); nan if
    a mask is empty."""
    # Infinite distances only come from an empty mask; MONAI's percentile of them is nan (see the
    # module docstring).
    if pred_to_truth.size == 0 or truth_to_pred.size == 0:
        return math.nan
    if not (np.isfinite(pred_to_truth).all() and np.isfinite(truth_to_pred).all()):
        return math.nan
    return float(max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95)))


def surface_dice_from_distances(
    pred_to_truth: np.ndarray, truth_to_pred: np.ndarray, tolerance_mm: float
) -> float:
    """Fraction of both surfaces' voxels within `tolerance_mm` of the other surface; nan if both
    masks are empty."""
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    total = pred_to_truth.size + truth_to_pred.size
    if total == 0:
        return math.nan
    # MONAI compares float32 distances with the tolerance in float32, so a distance that equals the
    # tolerance but for float64 rounding (3 x 0.8 mm against 2.4 mm) counts as within it; so here.
    tol = np.float32(tolerance_mm)
    within = np.count_nonzero(pred_to_truth.astype(np.float32) <= tol)
    within += np.count_nonzero(truth_to_pred.astype(np.float32) <= tol)
    return float(within) / total


def hd95(pred: Mask, truth: Mask, spacing: Spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two binary masks.

    Equal to MONAI's `compute_hausdorff_distance(percentile=95, directed=False)` with the same
    spacing. Empty masks: nan when either mask is empty (MONAI's rule; see the module docstring).
    """
    return hd95_from_distances(*surface_distances(pred, truth, spacing))


def surface_dice(pred: Mask, truth: Mask, spacing: Spacing, tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice at `tolerance_mm`: surface voxels of both masks within the tolerance,
    over all of them.

    Equal to MONAI's `compute_surface_dice(class_thresholds=[tolerance_mm], use_subvoxels=False)`
    with the same spacing. Empty masks (MONAI's rule): nan when both are empty, 0.0 when exactly one
    is.
    """
    return surface_dice_from_distances(*surface_distances(pred, truth, spacing), tolerance_mm)
