"""The label files `python -m realdata predict` writes beside its label maps, so that a viewer
shows each organ by its name and in one colour: labels.json (ids, names, colours), ITK-SNAP's
label description file (labels.txt) and a 3D Slicer color table (labels.ctbl).

Only the BTCV ids that the checkpoint's organs can produce are listed, with background (0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from common import write_json_atomic, write_text_atomic
from data import ORGAN_COLOURS
from realdata.archives import BTCV_IDS, BTCV_LEFT_KIDNEY, BTCV_RIGHT_KIDNEY

# data.ORGAN_COLOURS, the figures' colours; the left kidney is the kidneys' green darkened, so
# that the two sides stay apart
LEFT_KIDNEY_SHADE = 0.7
ID_NAMES = {BTCV_RIGHT_KIDNEY: "right kidney", BTCV_LEFT_KIDNEY: "left kidney"}
LABEL_FILES = ("labels.json", "labels.txt", "labels.ctbl")


def rgb255(colour: Sequence[float]) -> list[int]:
    """[0, 1] -> 0..255, halves rounded up (as 3D Slicer writes its tables)."""
    return [int(c * 255 + 0.5) for c in colour]


def label_entries(organs: Sequence[str]) -> list[dict]:
    """{"id", "name", "organ", "rgb"} of background and of each BTCV id that `organs` produce,
    by id."""
    entries = [{"id": 0, "name": "background", "organ": None, "rgb": [0, 0, 0]}]
    for organ in organs:
        for label in BTCV_IDS[organ]:
            colour = ORGAN_COLOURS[organ]
            if label == BTCV_LEFT_KIDNEY:
                colour = [c * LEFT_KIDNEY_SHADE for c in colour]
            name = ID_NAMES.get(label, organ)
            entries.append({"id": label, "name": name, "organ": organ, "rgb": rgb255(colour)})
    return sorted(entries, key=lambda e: e["id"])


def itksnap_text(entries: list[dict]) -> str:
    """ITK-SNAP's label description file: one line per label, IDX R G B A VIS MSH "LABEL" (colour
    0..255, A the opacity in 0..1, VIS and MSH whether the label shows in the slices and in 3D);
    lines that start with # are comments."""
    lines = [
        "# ITK-SNAP label description file: the label ids of SegViz predictions (BTCV's ids).",
        "# Columns: IDX R G B A VIS MSH LABEL (colour 0-255, A opacity 0-1, VIS shown in slices,",
        "# MSH shown in 3D). ITK-SNAP keeps its own label 0.",
    ]
    for e in entries:
        shown = 0 if e["id"] == 0 else 1
        r, g, b = e["rgb"]
        lines.append(
            f"{e['id']:5d} {r:5d} {g:4d} {b:4d} {shown:8d} {shown:2d} {shown:2d}    \"{e['name']}\""
        )
    return "\n".join(lines) + "\n"


def slicer_text(entries: list[dict]) -> str:
    """A 3D Slicer color table (.ctbl): one line per label, `index name r g b a`, colour and
    opacity 0..255, the name without spaces (Slicer reads an underscore back as a space)."""
    lines = ["# 3D Slicer color table: the label ids of SegViz predictions (BTCV's ids)",
             f"# {len(entries)} values"]
    for e in entries:
        alpha = 0 if e["id"] == 0 else 255
        lines.append(f"{e['id']} {e['name'].replace(' ', '_')} {' '.join(map(str, e['rgb']))} "
                     f"{alpha}")
    return "\n".join(lines) + "\n"


def write_label_files(folder: str, organs: Sequence[str]) -> None:
    """labels.json, labels.txt (ITK-SNAP) and labels.ctbl (3D Slicer) in `folder`, each whole."""
    entries = label_entries(organs)
    write_json_atomic(os.path.join(folder, "labels.json"), {"ids": "BTCV", "labels": entries})
    write_text_atomic(os.path.join(folder, "labels.txt"), itksnap_text(entries))
    write_text_atomic(os.path.join(folder, "labels.ctbl"), slicer_text(entries))
