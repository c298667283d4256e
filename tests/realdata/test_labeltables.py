"""The label files written beside predictions, read back as the programs read them: ITK-SNAP's
label description file line by line as ITK-SNAP parses it, the 3D Slicer color table as Slicer
parses it (and by Slicer's own reader where slicer-core is installed), and labels.json; the ids are
those the checkpoint's organs produce, the colours those of the figures' overlays."""

import json

import pytest

from data import ORGAN_COLOURS
from realdata.labeltables import LEFT_KIDNEY_SHADE, rgb255, write_label_files

ALL = ["liver", "spleen", "pancreas", "kidneys"]
NAMES = {0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 6: "liver",
         11: "pancreas"}


def read_itksnap(path) -> dict[int, dict]:
    """ITK-SNAP's reading (ColorLabelTable::LoadFromFile): a line that is empty or starts with #
    is skipped; otherwise the index, R, G, B (integers), the opacity (a float), the visibility and
    the mesh visibility (integers) are read in turn, and the label is what lies between the first
    two quotes; anything else is a syntax error."""
    labels = {}
    for number, line in enumerate(path.read_text().split("\n"), 1):
        if not line or line[0] == "#":
            continue
        fields, quoted = line.split('"', 1)[0].split(), line.split('"')
        assert len(fields) == 7 and len(quoted) >= 3, f"syntax error on line {number}: {line!r}"
        idx, r, g, b = (int(f) for f in fields[:4])
        alpha, visible, mesh = float(fields[4]), int(fields[5]), int(fields[6])
        assert 0 <= alpha <= 1 and all(0 <= c <= 255 for c in (r, g, b)), line
        labels[idx] = {"rgb": [r, g, b], "alpha": alpha, "visible": visible, "mesh": mesh,
                       "name": quoted[1]}
    return labels


def read_slicer(path) -> dict[int, dict]:
    """3D Slicer's reading of a .ctbl color table: lines starting with # are comments; each other
    line is `index name r g b a`, colours 0..255, an underscore in the name read as a space."""
    labels = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        index, name, *rgba = line.split()
        assert len(rgba) == 4, line
        labels[int(index)] = {"name": name.replace("_", " "), "rgb": [int(c) for c in rgba[:3]],
                              "alpha": int(rgba[3])}
    return labels


def expected_rgb(label: int, organ: str) -> list[int]:
    colour = ORGAN_COLOURS[organ]
    if label == 3:
        colour = [c * LEFT_KIDNEY_SHADE for c in colour]
    return rgb255(colour)


ORGAN_OF = {1: "spleen", 2: "kidneys", 3: "kidneys", 6: "liver", 11: "pancreas"}


def test_colours_are_written_as_slicer_rounds_them():
    assert rgb255((0.3, 0.8, 0.4)) == [77, 204, 102]  # halves rounded up, as Slicer writes them


@pytest.mark.parametrize("organs, ids", [
    (ALL, [0, 1, 2, 3, 6, 11]),
    (["liver", "spleen"], [0, 1, 6]),
    (["kidneys"], [0, 2, 3]),
])
def test_each_file_reads_back_with_the_ids_names_and_colours_of_the_checkpoints_organs(
    organs, ids, tmp_path
):
    write_label_files(str(tmp_path), organs)
    itk = read_itksnap(tmp_path / "labels.txt")
    slicer = read_slicer(tmp_path / "labels.ctbl")
    listed = json.loads((tmp_path / "labels.json").read_text())
    assert listed["ids"] == "BTCV"
    entries = {e["id"]: e for e in listed["labels"]}
    for table in (itk, slicer, entries):
        assert sorted(table) == ids
        assert {i: table[i]["name"] for i in ids} == {i: NAMES[i] for i in ids}
        assert table[0]["rgb"] == [0, 0, 0]
        for label in ids[1:]:
            assert table[label]["rgb"] == expected_rgb(label, ORGAN_OF[label]), (table, label)
    assert all(entries[i]["organ"] == ORGAN_OF[i] for i in ids[1:])
    # organs shown opaque, in the slices and in 3D; background hidden
    assert all((itk[i]["alpha"], itk[i]["visible"], itk[i]["mesh"]) == (1, 1, 1) for i in ids[1:])
    assert (itk[0]["alpha"], itk[0]["visible"]) == (0, 0)
    assert all(slicer[i]["alpha"] == 255 for i in ids[1:]) and slicer[0]["alpha"] == 0
    if 2 in ids:  # the two kidneys apart
        assert itk[2]["rgb"] != itk[3]["rgb"]


def test_slicers_own_reader_loads_the_color_table(tmp_path):
    # slicer-core (pip install slicer-core, with VTK: about 150 MB) is not a dependency: this runs
    # where it is installed
    slicer_core = pytest.importorskip("slicer_core")
    write_label_files(str(tmp_path), ALL)
    scene = slicer_core.vtkMRMLScene()
    table = slicer_core.vtkMRMLColorTableNode()
    storage = slicer_core.vtkMRMLColorTableStorageNode()
    scene.AddNode(table)
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "labels.ctbl"))
    assert storage.ReadData(table) == 1
    found = {}
    for i in range(table.GetNumberOfColors()):
        if table.GetColorDefined(i):
            rgba = [0.0] * 4
            table.GetColor(i, rgba)
            found[i] = (table.GetColorName(i), [round(c * 255) for c in rgba[:3]])
    assert found == {i: (NAMES[i], [0, 0, 0] if i == 0 else expected_rgb(i, ORGAN_OF[i]))
                     for i in NAMES}
