"""How much boundary quality a prediction loses on its way back to the scan's grid: the old path
(the label map taken on the working grid, brought back by nearest neighbour) against the one
`python -m realdata predict` takes (the probabilities brought back by trilinear interpolation,
the label map taken there).

The probabilities are those a perfect model would give: on the working grid, the share of each
voxel that the real CT's own labels (TotalSegmentator, on the scan's grid) fill, for each organ.
Both paths then write a label map in BTCV's ids on the scan's grid, scored against the labels
there (`realdata.score`): Dice, HD95 and NSD per organ. At the scan's own spacing both paths give
the labels back; at a coarser working spacing the nearest neighbour's blocks show.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.resources import REAL_CT, ROOT
from data import ORGAN_ID, ORGANS
from eval import label_map, organ_masks
from metrics import METRICS
from realdata.archives import BTCV_IDS
from realdata.nifti import read_nifti
from realdata.predict import masks_on_scan, to_btcv_ids
from realdata.preprocess import preprocess_arrays, ras_to_stored, to_original_grid
from realdata.score import organ_masks_of, organ_scores, voxel_spacing

REAL_LABELS = os.path.join(os.path.dirname(REAL_CT), "labels_totalsegmentator.nii.gz")
TOTALSEGMENTATOR_IDS = {"liver": (5,), "spleen": (1,), "pancreas": (7,), "kidneys": (2, 3)}
SPACINGS = (3.0, 4.5, 6.0)


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    import nibabel as nib

    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    return nib.orientations.apply_orientation(volume, ornt)


def working_probabilities(labels: np.ndarray, affine: np.ndarray, geometry: dict) -> torch.Tensor:
    """(K, ...) each organ's share of every working voxel (cropped to the body box, as the model
    sees the case): its mask on the scan's grid averaged over each working voxel."""
    ras = to_ras(labels, affine)
    box = tuple(slice(lo, hi) for lo, hi in geometry["box"])
    shares = []
    for organ in ORGANS:
        mask = torch.from_numpy(np.isin(ras, TOTALSEGMENTATOR_IDS[organ])).float()
        share = F.interpolate(mask[None, None], size=geometry["resampled"], mode="area")[0, 0]
        shares.append(share[box])
    return torch.stack(shares)


def nearest_path(probs: torch.Tensor, geometry: dict) -> np.ndarray:
    """The old predict: the label map on the working grid, back by nearest neighbour."""
    masks = organ_masks(probs, ORGANS, "merged")
    return to_original_grid(to_btcv_ids(label_map(masks)), geometry)


def trilinear_path(probs: torch.Tensor, geometry: dict) -> np.ndarray:
    """predict now: the probabilities back by trilinear interpolation, the label map there."""
    masks = masks_on_scan(probs, ORGANS, "merged", geometry, largest=False)
    return ras_to_stored(to_btcv_ids(label_map(masks)), geometry)


def bench_boundary(args: argparse.Namespace) -> dict:
    """For each working spacing: Dice, HD95 and NSD per organ of both paths' label maps against
    the CT's own labels."""
    hu, affine = read_nifti(args.ct)
    labels, _ = read_nifti(args.labels)
    labels = np.asarray(labels).astype(np.int16)
    truth = {o: np.isin(labels, TOTALSEGMENTATOR_IDS[o]) for o in ORGANS}
    spacing = voxel_spacing(affine)
    result = {"ct": os.path.relpath(args.ct, ROOT), "voxel_mm": [round(s, 3) for s in spacing],
              "by_spacing": {}}
    for s in args.spacings:
        case = preprocess_arrays(hu, affine, None, None, 0, (s, s, s))
        probs = working_probabilities(labels, affine, case.geometry)
        result["by_spacing"][f"{s:g}"] = {
            path: organ_scores(organ_masks_of(written, BTCV_IDS), truth, spacing)
            for path, written in (
                ("nearest", nearest_path(probs, case.geometry)),
                ("trilinear", trilinear_path(probs, case.geometry)),
            )
        }
    return result


def boundary_table(r: dict, organs: Sequence[str] = tuple(ORGAN_ID)) -> str:
    """One row per working spacing and path, Dice / HD95 (mm) / NSD per organ."""
    head = "| working mm | path      | " + " | ".join(f"{o:^20}" for o in organs) + " |"
    voxel = " x ".join(f"{v:g}" for v in r["voxel_mm"])
    lines = [f"scored on the CT's own grid ({voxel} mm); each cell Dice / HD95 mm / NSD", head,
             "|------------|-----------|" + "|".join("-" * 22 for _ in organs) + "|"]
    for s, paths in r["by_spacing"].items():
        for path, scores in paths.items():
            cells = [
                " / ".join(
                    "nan" if scores[m][o] != scores[m][o] else f"{scores[m][o]:.{d}f}"
                    for m, d in zip(METRICS, (3, 1, 3))
                )
                for o in organs
            ]
            lines.append(f"| {s:>10} | {path:<9} | " + " | ".join(f"{c:^20}" for c in cells) + " |")
    return "\n".join(lines)
