"""experiments.py: tables over seeds with significance marks, HD95/NSD tables, and figures."""

import pytest
import torch


def test_figures_without_matplotlib_say_so_in_one_line(monkeypatch, capsys):
    import sys

    import figures as ev

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(SystemExit) as e:
        ev._pyplot()
    assert e.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_box_plot_has_one_row_per_number_of_nodes(tmp_path):
    pytest.importorskip("matplotlib")
    from figures import box_plot

    def metrics(nodes, organs, level):
        return [{"nodes": nodes, "dice": {o: {"cases": [level, level + 0.1, level - 0.1]} for o in organs}}]

    two = {"segviz-2": metrics(2, ["liver", "spleen"], 0.8), "single-2": metrics(2, ["liver", "spleen"], 0.6)}
    three = {"segviz-3": metrics(3, ["liver", "spleen", "pancreas"], 0.7)}
    box_plot(two, tmp_path / "one.png")
    box_plot({**two, **three}, tmp_path / "two.png")
    (w1, h1), (w2, h2) = png_size(tmp_path / "one.png"), png_size(tmp_path / "two.png")
    # a pancreas column appears with the three-node runs, and a second row of panels
    assert w2 == pytest.approx(w1 * 3 / 2, rel=0.02) and h2 == pytest.approx(2 * h1, rel=0.02)


def write_run(folder, mode, nodes, seed, cases_by_organ, scoring="classes", by_scoring=None, surface=None):
    """A metrics.json as train.py wrote it before surface metrics ("dice_by_scoring"), or, with
    `surface` ({scoring: {"hd95": ..., "nsd": ...}}), as it writes it now ("by_scoring")."""
    import json
    import os

    from eval import summarise

    d = os.path.join(folder, f"{mode}-{nodes}", f"seed-{seed}")
    os.makedirs(d)
    m = {"mode": mode, "nodes": nodes, "seed": seed, "organs": list(cases_by_organ),
         "dice": summarise(cases_by_organ), "scoring": scoring, "config": {"fedbn": False, "loss": "dice"}}
    by_scoring = by_scoring or {scoring: cases_by_organ}
    if surface:
        m["by_scoring"] = {k: {"dice": summarise(v), **{metric: summarise(values)
                                                        for metric, values in surface.get(k, {}).items()}}
                           for k, v in by_scoring.items()}
        m.update({metric: m["by_scoring"][scoring].get(metric, {}) for metric in ("hd95", "nsd")})
    elif len(by_scoring) > 1:
        m["dice_by_scoring"] = {k: summarise(v) for k, v in by_scoring.items()}
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump(m, f)


def test_compare_reports_mean_and_std_over_seeds_and_tests_matched_pairs(tmp_path):
    import json

    from experiments import compare_runs

    seg = {0: [0.8, 0.9], 1: [0.6, 0.7], 2: [0.7, 0.8]}  # per-seed means 0.85, 0.65, 0.75
    for seed, cases in seg.items():
        merged = {"liver": cases}
        heads = {"liver": [c - 0.1 for c in cases]}
        write_run(tmp_path, "segviz", 2, seed, merged, "merged", {"merged": merged, "heads": heads})
        write_run(tmp_path, "central", 2, seed, {"liver": [c - 0.3 for c in cases]})
    (tmp_path / "segviz-2" / "seed-0" / "eval").mkdir()
    (tmp_path / "segviz-2" / "seed-0" / "eval" / "metrics.json").write_text('{"checkpoint": "x"}')
    text = compare_runs(str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["segviz-2"]["liver"]["mean"] == pytest.approx(0.75)
    assert result["segviz-2"]["liver"]["std"] == pytest.approx(0.1)  # sample std of 0.85, 0.65, 0.75
    assert result["segviz-2 (heads)"]["liver"]["mean"] == pytest.approx(0.65)
    # six matched (seed, case) pairs, every one 0.3 lower: the signed-rank test's smallest p for n = 6
    assert result["central-2"]["liver"]["p_vs_segviz"] == pytest.approx(0.03125)
    assert "0.750 ± 0.100" in text and "3 seed(s)" in text


def test_compare_counts_a_run_trained_without_test_with_its_later_evaluation(tmp_path):
    import json
    import shutil

    from experiments import compare_runs

    for seed, cases in {0: [0.8, 0.9], 1: [0.6, 0.7]}.items():
        write_run(tmp_path, "segviz", 2, seed, {"liver": cases})
        d = tmp_path / "segviz-2" / f"seed-{seed}"
        scored = json.loads((d / "metrics.json").read_text())
        (d / "eval").mkdir()
        (d / "eval" / "metrics.json").write_text(json.dumps({**scored, "checkpoint": str(d / "model.pt")}))
        (d / "metrics.json").write_text(json.dumps({**scored, "dice": {}}))  # as --no-test writes it
    compare_runs(str(tmp_path))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["segviz-2"]["liver"]["mean"] == pytest.approx(0.75)
    # a run not yet evaluated is left out, not counted as zero
    shutil.rmtree(tmp_path / "segviz-2" / "seed-1" / "eval")
    compare_runs(str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["segviz-2"]["liver"]["mean"] == pytest.approx(0.85)


def md_row(table, name):
    """The cells of the markdown row named exactly `name`."""
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {name} |")]
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_compare_adds_hd95_and_nsd_tables_with_means_over_finite_values_and_nan_counts(tmp_path):
    import json

    from experiments import compare_runs

    nan = float("nan")
    hd95 = {0: [10.0, nan], 1: [12.0, 14.0], 2: [nan, nan]}  # seed means 10 and 13; seed 2 has none
    nsd = {0: [0.5, 0.7], 1: [0.6, 0.8], 2: [0.9, 0.9]}  # seed means 0.6, 0.7, 0.9
    for seed in range(3):
        surface = {"merged": {"hd95": {"liver": hd95[seed]}, "nsd": {"liver": nsd[seed]}},
                   "heads": {"hd95": {"liver": [5.0, 5.0]}, "nsd": {"liver": [1.0, 1.0]}}}
        write_run(tmp_path, "segviz", 2, seed, {"liver": [0.8, 0.9]}, "merged",
                  {"merged": {"liver": [0.8, 0.9]}, "heads": {"liver": [0.7, 0.8]}}, surface)
        write_run(tmp_path, "central", 2, seed, {"liver": [0.5, 0.6]})  # evaluated before surface metrics
    text = compare_runs(str(tmp_path))
    dice_at, hd_at, nsd_at = (text.index(t) for t in ("| setup |", "HD95 in mm", "NSD at 2 mm"))
    assert dice_at < hd_at < nsd_at
    hd_table = text[hd_at:nsd_at]
    # 11.5 = mean of the seeds' 10 and 13; std over those two seeds; three (seed, case) pairs had no value
    assert md_row(hd_table, "segviz-2") == ["segviz-2", "11.5 ± 2.1 (3 nan)"]
    assert md_row(hd_table, "segviz-2 (heads)") == ["segviz-2 (heads)", "5.0 ± 0.0"]
    assert md_row(hd_table, "central-2") == ["central-2", "—"]
    assert md_row(text[nsd_at:], "segviz-2") == ["segviz-2", "0.733 ± 0.153"]
    assert md_row(text[dice_at:hd_at], "central-2")[1].endswith("*")  # Dice keeps its Wilcoxon marks
    result = json.loads((tmp_path / "results.json").read_text())
    liver = result["segviz-2"]["liver"]
    assert liver["mean"] == pytest.approx(0.85)  # Dice where it always was
    assert liver["hd95"]["mean"] == pytest.approx(11.5) and liver["hd95"]["nan"] == 3
    assert liver["hd95"]["seeds"] == [10.0, 13.0, None]
    assert liver["nsd"]["mean"] == pytest.approx(0.7333333) and "nan" not in liver["nsd"]
    assert "hd95" not in result["central-2"]["liver"]


def test_radiological_puts_the_patients_right_on_the_images_left_and_anterior_up():
    from figures import radiological

    plane = torch.zeros(4, 3)  # (x, y) of a RAS volume: x grows to the patient's right, y to anterior
    plane[3, 2] = 1  # right and anterior
    plane[0, 0] = 2  # left and posterior
    image = radiological(plane)
    assert image.shape == (3, 4)  # rows from y, columns from x
    assert image[0, 0] == 1 and image[-1, -1] == 2


def test_overlay_shows_an_organ_on_the_patients_right_on_the_images_left_and_anterior_superior_up():
    pytest.importorskip("matplotlib")
    import numpy as np

    from data import ORGAN_ID, Case
    from figures import overlay_figure

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
