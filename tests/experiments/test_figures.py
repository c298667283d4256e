"""Figures of compared runs: box plots, overlays in radiological convention, and a clear line
when matplotlib is missing."""

import pytest
import torch


def test_figures_without_matplotlib_say_so_in_one_line(monkeypatch, capsys):
    import sys

    from experiments import figures as ev

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit) as e:
        ev.pyplot()
    assert e.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_box_plot_has_one_row_per_number_of_nodes(tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.figures import box_plot

    def metrics(nodes, organs, level):
        return [
            {
                "nodes": nodes,
                "dice": {o: {"cases": [level, level + 0.1, level - 0.1]} for o in organs},
            }
        ]

    two = {
        "segviz-2": metrics(2, ["liver", "spleen"], 0.8),
        "single-2": metrics(2, ["liver", "spleen"], 0.6),
    }
    three = {"segviz-3": metrics(3, ["liver", "spleen", "pancreas"], 0.7)}
    box_plot(two, tmp_path / "one.png")
    box_plot({**two, **three}, tmp_path / "two.png")
    (w1, h1), (w2, h2) = png_size(tmp_path / "one.png"), png_size(tmp_path / "two.png")
    # a pancreas column appears with the three-node runs, and a second row of panels
    assert w2 == pytest.approx(w1 * 3 / 2, rel=0.02) and h2 == pytest.approx(2 * h1, rel=0.02)


def test_radiological_puts_the_patients_right_on_the_images_left_and_anterior_up():
    from experiments.figures import radiological

    # (x, y) of a RAS volume: x grows to the patient's right, y to anterior
    plane = torch.zeros(4, 3)
    plane[3, 2] = 1  # right and anterior
    plane[0, 0] = 2  # left and posterior
    image = radiological(plane)
    assert image.shape == (3, 4)  # rows from y, columns from x
    assert image[0, 0] == 1 and image[-1, -1] == 2


def test_overlay_shows_an_organ_on_the_patients_right_on_the_images_left_and_anterior_superior_up():
    pytest.importorskip("matplotlib")
    import numpy as np

    from data import ORGAN_ID, Case
    from experiments.figures import overlay_figure

    shape = (40, 30, 20)
    label = torch.zeros(shape, dtype=torch.uint8)
    # the patient's right (high x), anterior (high y) and superior (high z): like a liver's dome
    label[26:36, 18:27, 12:18] = ORGAN_ID["liver"]
    case = Case("c", torch.zeros(shape), label, (3.0, 3.0, 3.0))
    fig = overlay_figure(case, [("truth", label)])
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(int)
    height = pixels.shape[0]
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    liver = (r - g > 30) & (r - b > 30)  # the orange overlay; the yellow letters have r == g
    for ax in fig.axes:  # axial, then coronal
        box = ax.get_window_extent()
        top, bottom = height - int(box.y1), height - int(box.y0)
        rows, cols = np.nonzero(liver[top:bottom, int(box.x0):int(box.x1)])
        assert len(rows) > 20
        assert cols.mean() / box.width < 0.4  # image's left: the patient's right
        assert rows.mean() / box.height < 0.4  # top: anterior (axial) or superior (coronal)
        letters = {t.get_text(): t.get_position()[0] for t in ax.texts}
        assert letters["R"] < 0.5 < letters["L"]
    import matplotlib.pyplot as plt

    plt.close(fig)
