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


def fake_runs(nodes, organs, level, mode="segviz", seeds=2, hd95=None):
    """A setup's seeds as read_runs gives them: the three metrics per test case, scored as the
    mode scores them, and a loss per site and round."""
    scorings = ("merged", "heads") if mode in ("segviz", "single") else ("classes",)
    per_case = {"dice": [level, level + 0.1, level - 0.1], "hd95": hd95 or [4.0, None, 6.0],
                "nsd": [level, level, level]}
    scores = {metric: {o: {"cases": cases} for o in organs} for metric, cases in per_case.items()}
    sites = organs if mode in ("segviz", "single") else ["pooled"]
    return [{"nodes": nodes, "mode": mode, "seed": s, **scores,
             "by_scoring": dict.fromkeys(scorings, scores),
             "losses": {site: [1.0 / (r + 1 + s) for r in range(6)] for site in sites}}
            for s in range(seeds)]


@pytest.mark.parametrize("metric", ["dice", "hd95", "nsd"])
def test_box_plot_has_one_row_per_number_of_nodes(metric, tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.figures import box_plot

    two = {
        "segviz-2": fake_runs(2, ["liver", "spleen"], 0.8),
        "central-2": fake_runs(2, ["liver", "spleen"], 0.6, "central"),
    }
    three = {"segviz-3": fake_runs(3, ["liver", "spleen", "pancreas"], 0.7)}
    box_plot(two, tmp_path / "one.png", metric)
    box_plot({**two, **three}, tmp_path / "two.png", metric)
    (w1, h1), (w2, h2) = png_size(tmp_path / "one.png"), png_size(tmp_path / "two.png")
    # a pancreas column appears with the three-node runs, and a second row of panels
    assert w2 == pytest.approx(w1 * 3 / 2, rel=0.02) and h2 == pytest.approx(2 * h1, rel=0.02)


def test_box_plot_boxes_are_the_tables_rows_with_every_seed_and_case(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from experiments.figures import box_plot

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "boxplot",
                        lambda ax, data, **kw: drawn.append((ax, data)))
    runs = {"segviz-2": fake_runs(2, ["liver", "spleen"], 0.8, hd95=[4.0, None, float("nan")]),
            "central-2": fake_runs(2, ["liver", "spleen"], 0.6, "central")}
    box_plot(runs, tmp_path / "hd.png", "hd95")
    liver = {ax.get_title(): data for ax, data in drawn}["liver"]
    # segviz (merged), segviz (heads), central: two seeds x the cases with a value each
    assert liver == [[4.0, 4.0], [4.0, 4.0], [4.0, 6.0, 4.0, 6.0]]


def test_loss_curves_show_each_sites_loss_per_round(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from experiments import figures

    runs = {"segviz-2": fake_runs(2, ["liver", "spleen"], 0.8),
            "central-2": fake_runs(2, ["liver", "spleen"], 0.6, "central")}
    made = []
    real_savefig = plt.Figure.savefig

    def keep(fig, path, **kw):
        made.append(fig)
        real_savefig(fig, path, **kw)

    plt.Figure.savefig = keep
    try:
        figures.loss_curves(runs, tmp_path / "loss.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert png_size(tmp_path / "loss.png")[0] > 0
    segviz, central = made[0].axes[:2]
    assert [line.get_label() for line in segviz.get_lines()] == ["liver", "spleen"]
    assert [line.get_label() for line in central.get_lines()] == ["pooled"]
    liver = segviz.get_lines()[0].get_ydata()
    # the mean over the two seeds of 1 / (round + seed)
    assert liver[0] == pytest.approx((1 / 1 + 1 / 2) / 2) and len(liver) == 6


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


def test_overlay_has_an_axial_row_through_each_organ_and_a_legend():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    import numpy as np

    from data import ORGAN_COLOURS, ORGAN_ID, Case
    from experiments.figures import overlay_figure

    shape = (40, 30, 24)
    label = torch.zeros(shape, dtype=torch.uint8)
    label[26:36, 10:20, 16:22] = ORGAN_ID["liver"]  # high: only axial slices near z 19 show it
    label[4:12, 10:20, 2:8] = ORGAN_ID["kidneys"]  # low: slices near z 5
    case = Case("c", torch.full(shape, -1000.0), label, (3.0, 3.0, 3.0))  # air: black
    fig = overlay_figure(case, [("truth", label), ("model", label)])
    fig.canvas.draw()
    assert len(fig.axes) == 3 * 2  # liver and kidneys rows (axial), then coronal; two columns
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == [
        "liver\n(axial)", "kidneys\n(axial)", "all organs\n(coronal)"]
    pixels = np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(int)
    height = pixels.shape[0]

    def shows(ax, organ):
        box = ax.get_window_extent()
        crop = pixels[height - int(box.y1):height - int(box.y0), int(box.x0):int(box.x1)]
        r, g, b = (crop[..., k] for k in range(3))
        colour = np.array(ORGAN_COLOURS[organ]) * 255
        # over a black CT the overlay is the colour at 45 %
        near = sum(np.abs(c - 0.45 * v) < 12 for c, v in zip((r, g, b), colour)) == 3
        return near.sum() > 10

    liver_row, kidneys_row, coronal = fig.axes[0], fig.axes[2], fig.axes[4]
    assert shows(liver_row, "liver") and not shows(liver_row, "kidneys")
    assert shows(kidneys_row, "kidneys") and not shows(kidneys_row, "liver")
    assert shows(coronal, "liver") and shows(coronal, "kidneys")
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert names == list(ORGAN_COLOURS)
    plt.close(fig)
