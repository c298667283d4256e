"""`python -m realdata predict -i SCANS -o LABELS --checkpoint OUT/model.pt`: segment every
NIfTI scan of a folder (or one scan) with a trained checkpoint, each label map on its scan's own
grid and orientation, with BTCV's label ids; optionally each organ's probability map.

The model runs on the working grid (RAS, the checkpoint's spacing, cropped to the body); its
output probabilities are brought to the scan's own grid by trilinear interpolation and only there
read as a label map, as nnU-Net and MONAI do, so boundaries fall between the working voxels.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import config_of, model_of, read_checkpoint
from common import check_writable, fail, write_atomic
from data import ORGAN_ID, DataError
from eval import clean_masks, label_map, organ_masks, predict_scores
from realdata.archives import BTCV_IDS, BTCV_LEFT_KIDNEY, BTCV_RIGHT_KIDNEY
from realdata.labeltables import write_label_files
from realdata.nifti import output_header, read_nifti, save_label_nifti
from realdata.preprocess import preprocess_arrays, ras_to_stored, resampled_slabs
from segviz import MODES
from settings import Config, add_arguments, given_of

# ---------------------------------------------------------------------------------------
# Label maps written on the scan's grid, in BTCV's ids
# ---------------------------------------------------------------------------------------


def mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding a mask's voxels; None if it has none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(hits):
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def to_btcv_ids(label: torch.Tensor) -> np.ndarray:
    """ORGAN_ID label map (RAS order) -> BTCV ids; each kidney component becomes the
    right (2) or left (3) kidney by the side of the midline its centre lies on (+x is the
    patient's right). The midline: halfway between the two largest components where they lie
    apart in x (the two kidneys), else the middle of the volume (the case is cropped to the
    body, but a table or the arms can move that off the spine)."""
    from scipy import ndimage

    lab = label.cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    out = np.zeros(lab.shape, np.uint8)
    for organ in ("liver", "spleen", "pancreas"):
        out[lab == ORGAN_ID[organ]] = BTCV_IDS[organ][0]
    box = mask_box(lab == ORGAN_ID["kidneys"])
    if box is None:
        return out
    # the components are found in the kidneys' box only: on a scan's own grid, labelling the
    # whole volume would take several bytes per voxel of the scan
    kidney = lab[box] == ORGAN_ID["kidneys"]
    parts, n = ndimage.label(kidney, structure=np.ones((3, 3, 3), bool))
    index = range(1, n + 1)
    x0 = box[0].start
    centres = [x0 + c[0] for c in ndimage.center_of_mass(kidney, parts, index)]
    midline = (lab.shape[0] - 1) / 2
    if n >= 2:
        sizes = ndimage.sum_labels(kidney, parts, index)
        a, b = np.argsort(sizes)[::-1][:2]
        spans = ndimage.find_objects(parts)
        lo, hi = sorted((a, b), key=lambda i: centres[i])
        if spans[lo][0].stop <= spans[hi][0].start:  # no overlap in x: one on each side
            midline = x0 + (spans[lo][0].stop + spans[hi][0].start - 1) / 2
    side = np.array(
        [0] + [BTCV_RIGHT_KIDNEY if c > midline else BTCV_LEFT_KIDNEY for c in centres],
        np.uint8,
    )
    out[box][kidney] = side[parts[kidney]]
    return out


def channel_fill(channels: int, scoring: str) -> list[float]:
    """Each output channel's value where the model did not look (outside the body box): no organ
    anywhere, so a multi-class model's background channel (channel 0) is 1 and the rest 0."""
    return [1.0 if scoring == "classes" and c == 0 else 0.0 for c in range(channels)]


def masks_on_scan(scores: torch.Tensor, organs: Sequence[str], scoring: str, geometry: dict,
                  largest: bool) -> dict[str, torch.Tensor]:
    """Each organ's mask on the scan's own grid, in RAS order: the model's blended output on the
    working grid resampled there (trilinear, a slab at a time: `resampled_slabs`), read as masks
    there by the mode's own rule (`eval.organ_masks`: the heads merged and the argmax, the argmax
    of the classes, or each head above 0.5), then cleaned up (`largest`) as the run was.

    Resampling the probabilities and not the label map puts each boundary between the working
    grid's voxels, where the probability crosses over, instead of on their blocky edges."""
    fill = channel_fill(scores.shape[0], scoring)
    masks = {organ: np.zeros(geometry["ras_shape"], bool) for organ in organs}
    for rows, values in resampled_slabs(scores, geometry, fill):
        for organ, mask in organ_masks(values, organs, scoring).items():
            masks[organ][rows] = mask.numpy()
    return clean_masks({o: torch.from_numpy(m) for o, m in masks.items()}, largest)


def save_prediction(masks: dict[str, torch.Tensor], geometry: dict, path: str) -> None:
    """Masks on the scan's grid (RAS order) as one NIfTI label map in BTCV's ids, in the scan's
    own array order and affine."""
    save_label_nifti(ras_to_stored(to_btcv_ids(label_map(masks)), geometry), geometry, path)


# ---------------------------------------------------------------------------------------
# Scans in, label maps out
# ---------------------------------------------------------------------------------------

NNUNET_CHANNEL = "_0000"  # nnU-Net names a case's (only) CT channel CASE_0000.nii.gz


def scan_name(filename: str) -> str | None:
    """The case a NIfTI file name stands for (nnU-Net's channel suffix dropped); None if the file
    is not a NIfTI image, or is hidden (macOS "._" companions, temporary files)."""
    if filename.startswith(".") or not filename.endswith((".nii.gz", ".nii")):
        return None
    stem = filename[: -len(".nii.gz")] if filename.endswith(".nii.gz") else filename[: -len(".nii")]
    return (
        stem[: -len(NNUNET_CHANNEL)]
        if stem.endswith(NNUNET_CHANNEL) and stem != NNUNET_CHANNEL
        else stem
    )


def list_scans(path: str, flag: str = "-i") -> list[tuple[str, str]]:
    """(case, file) of every NIfTI image in the folder `path` (or of the one file `path`), sorted;
    bad input fails naming the command line's `flag`."""
    if os.path.isfile(path):
        name = scan_name(os.path.basename(path))
        if name is None:
            fail(f"{flag} {path}: not a NIfTI image (.nii or .nii.gz)")
        return [(name, path)]
    if not os.path.isdir(path):
        fail(f"{flag} {path}: no such folder")
    scans: dict[str, str] = {}
    for filename in sorted(os.listdir(path)):
        name = scan_name(filename)
        if name is None or not os.path.isfile(os.path.join(path, filename)):
            continue
        if name in scans:
            first = os.path.basename(scans[name])
            fail(f"{flag} {path}: {first} and {filename} are both case {name}")
        scans[name] = os.path.join(path, filename)
    if not scans:
        fail(f"{flag} {path}: no NIfTI image (.nii or .nii.gz) in it")
    return sorted(scans.items())


def read_scan(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A scan to segment and its affine, checked as read_nifti checks, and finite; DataError
    naming the file and the problem otherwise."""
    image, affine = read_nifti(path)
    if np.issubdtype(image.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        if bad:
            raise DataError(f"{path}: {bad} NaN or inf voxel(s)")
    return image, affine


def ct_warning(image: np.ndarray) -> str | None:
    """Why a scan's intensities do not look like CT in Hounsfield units, or None.

    The rule: a CT of the body holds air (about -1000 HU) around and inside it, and bone or
    contrast above 100 HU. A scan whose lowest value is above -500 has no air (an MR image, a CT
    stored without its rescale, or one normalised: every value in [0, 1] or [0, 255] says which),
    and one whose highest is below 100 has nothing denser than soft tissue."""
    low, high = float(image.min()), float(image.max())
    if low >= 0 and high <= 1:
        why = "every value within [0, 1]: normalised?"
    elif low >= 0 and high <= 255:
        why = "every value within [0, 255]: an 8-bit image?"
    elif low > -500:
        why = "none below -500, so no air: an MR image, or a CT stored without its rescale?"
    elif high < 100:
        why = "none above 100, so no bone and no contrast"
    else:
        return None
    return (
        f"intensities {low:g} to {high:g} do not look like CT in Hounsfield units ({why}); "
        "the model reads HU, its labels may be wrong"
    )


PHANTOM_WARNING = (
    "trained on the built-in phantom (synthetic shapes), not on real scans; its labels on a real "
    "CT mean little"
)


def organ_probabilities(
    scores: torch.Tensor, organs: Sequence[str], scoring: str
) -> dict[str, torch.Tensor]:
    """Each organ's probability from a model's blended output: a binary head's own, or the
    multi-class softmax's channel of the organ (channel 0 is background)."""
    first = 1 if scoring == "classes" else 0
    return {organ: scores[first + k] for k, organ in enumerate(organs)}


PROBABILITY_STEP = 1 / 32767  # int16's step over [0, 1]: finer than float16 in the same 2 bytes


def save_probability(prob: torch.Tensor, geometry: dict, path: str) -> None:
    """One organ's probability (working grid) on the scan's own grid and affine, atomically.

    Resampled as the label map's scores are (trilinear, `resampled_slabs`), so a voxel of the label
    map goes to an organ where these cross over. Stored as int16 with the scale factor
    PROBABILITY_STEP (scl_slope), filled a slab at a time: NIfTI has no float16 type, int16 takes
    the same two bytes at a finer step, and every NIfTI reader applies the scale factor."""
    import nibabel as nib

    ras = np.empty(geometry["ras_shape"], np.int16)
    for rows, values in resampled_slabs(prob[None], geometry, (0.0,)):
        ras[rows] = (values[0].clamp(0, 1) / PROBABILITY_STEP).round().to(torch.int16).numpy()
    data = ras_to_stored(ras, geometry)
    img = nib.Nifti1Image(data, np.asarray(geometry["affine"]), output_header(geometry))
    img.set_data_dtype(np.int16)
    img.header.set_slope_inter(PROBABILITY_STEP, 0)
    write_atomic(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")


def main(argv: list[str] | None = None) -> int:
    """python -m realdata predict -i IN -o OUT --checkpoint MODEL: every scan in IN segmented."""
    p = argparse.ArgumentParser(
        prog="python -m realdata predict",
        description="Segment every NIfTI scan (HU) in a folder with a checkpoint written by "
                    "train.py: OUT/<case>.nii.gz, a label map in BTCV's ids (1 spleen, 2 right "
                    "kidney, 3 left kidney, 6 liver, 11 pancreas; the checkpoint's organs only) "
                    "on the scan's own grid and affine, and OUT/labels.json, labels.txt "
                    "(ITK-SNAP) and labels.ctbl (3D Slicer) naming and colouring the ids. "
                    "nnU-Net's _0000 suffix is dropped from the case name. A scan that cannot be "
                    "read is named and skipped; the command then exits 1.",
    )
    p.add_argument(
        "-i",
        "--input",
        required=True,
        metavar="IN",
        help="folder of .nii/.nii.gz scans (or one scan)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the label maps")
    p.add_argument("--checkpoint", required=True, help="model.pt written by train.py")
    p.add_argument(
        "--overwrite", action="store_true", help="predict again the scans OUT already holds"
    )
    p.add_argument(
        "--save-prob",
        action="store_true",
        help="also write OUT/<case>_<organ>.nii.gz, each organ's probability on the same grid "
        "(int16 scaled to [0, 1]: NIfTI has no float16)",
    )
    add_arguments(p, only=("device", "overlap", "largest"))
    args = p.parse_args(argv)
    given = given_of(args)
    if "overlap" in given and not 0 <= given["overlap"] < 1:
        p.error("--overlap must be in [0, 1)")
    check_writable(args.output, "-o")
    scans = list_scans(args.input)
    if any(os.path.realpath(os.path.dirname(f)) == os.path.realpath(args.output) for _, f in scans):
        fail(f"-o {args.output}: is where the scans are; the label maps would take their names")
    ckpt = read_checkpoint(args.checkpoint)
    if (ckpt.get("source") or {}).get("source") == "phantom":
        print(f"warning: {args.checkpoint}: {PHANTOM_WARNING}", file=sys.stderr)
    cfg = replace(config_of(ckpt, device=given.pop("device", "auto"), parser=p), **given)
    os.makedirs(args.output, exist_ok=True)
    write_label_files(args.output, ckpt["organs"])
    return predict_scans(ckpt, cfg, scans, args)


def predict_scans(
    ckpt: dict, cfg: Config, scans: list[tuple[str, str]], args: argparse.Namespace
) -> int:
    """Segment each (case, file) into args.output; exit status 1 if some scan could not be read."""
    organs = ckpt["organs"]
    model = model_of(ckpt).to(cfg.device).eval()
    scoring = MODES[ckpt["mode"]].scorings[0]
    failed, skipped = [], 0
    bar = tqdm(scans, desc="predict", unit="scan", disable=None, dynamic_ncols=True)
    for name, path in bar:
        out = os.path.join(args.output, f"{name}.nii.gz")
        probs = (
            {o: os.path.join(args.output, f"{name}_{o}.nii.gz") for o in organs}
            if args.save_prob
            else {}
        )
        if not args.overwrite and all(os.path.exists(f) for f in (out, *probs.values())):
            skipped += 1
            bar.write(f"{out}: already written, skipped (--overwrite predicts it again)")
            continue
        try:
            image, affine = read_scan(path)
        except DataError as e:
            failed.append(path)
            bar.write(f"error: {e}; skipped", file=sys.stderr)
            continue
        warning = ct_warning(image)
        if warning:
            bar.write(f"warning: {path}: {warning}", file=sys.stderr)
        case = preprocess_arrays(
            image, affine, None, None, 0, cfg.spacing, name, os.path.abspath(path)
        )
        del image
        scores = predict_scores(model, case, cfg)
        for organ, prob in organ_probabilities(scores, organs, scoring).items():
            if organ in probs:
                save_probability(prob, case.geometry, probs[organ])
        masks = masks_on_scan(scores, organs, scoring, case.geometry, cfg.largest)
        del scores
        save_prediction(masks, case.geometry, out)  # last: its presence means the case is done
        voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000
        bar.write(
            f"{out}: "
            + ", ".join(f"{o} {int(m.sum()) * voxel_ml:.1f} mL" for o, m in masks.items())
        )
    bar.close()
    print(
        f"{len(scans) - skipped - len(failed)} scan(s) segmented into {args.output}, {skipped} "
        f"already there, {len(failed)} failed"
    )
    if failed:
        print(
            f"error: {len(failed)} scan(s) could not be segmented: {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0
