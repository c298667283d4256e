"""Tests of eval.py: Dice, sliding-window inference, organ masks, result tables and checkpoint loading."""

import pytest
import torch

from eval import (
    CHECKPOINT_FORMAT,
    dice,
    format_table,
    label_dice,
    load_checkpoint,
    organ_masks,
    sliding_window,
    summarise,
)

# ---------------------------------------------------------------------------------------
# Dice
# ---------------------------------------------------------------------------------------


def mask(shape, *voxels):
    m = torch.zeros(shape, dtype=torch.bool)
    for v in voxels:
        m[v] = True
    return m


def test_dice_of_identical_masks_is_one():
    m = mask((4, 4, 4), (0, 0, 0), (1, 2, 3), (3, 3, 3))
    assert dice(m, m.clone()) == 1.0


def test_dice_of_disjoint_masks_is_zero():
    assert dice(mask((4, 4, 4), (0, 0, 0)), mask((4, 4, 4), (1, 1, 1))) == 0.0


def test_dice_partial_overlap_matches_hand_computation():
    # pred 3 voxels, truth 2 voxels, 1 shared: 2 * 1 / (3 + 2)
    pred = mask((4, 4, 4), (0, 0, 0), (0, 0, 1), (0, 0, 2))
    truth = mask((4, 4, 4), (0, 0, 2), (3, 3, 3))
    assert dice(pred, truth) == pytest.approx(0.4)
    assert dice(truth, pred) == pytest.approx(0.4)  # symmetric


def test_dice_of_two_empty_masks_is_one():
    assert dice(mask((3, 3, 3)), mask((3, 3, 3))) == 1.0


def test_dice_with_exactly_one_empty_mask_is_zero():
    some = mask((3, 3, 3), (1, 1, 1))
    assert dice(some, mask((3, 3, 3))) == 0.0
    assert dice(mask((3, 3, 3)), some) == 0.0


def test_dice_treats_nonzero_values_as_foreground():
    # integer label maps count any nonzero voxel, whatever its value
    pred = torch.tensor([0, 2, 2, 0])
    truth = torch.tensor([0, 1, 0, 0])
    assert dice(pred, truth) == pytest.approx(2 * 1 / 3)


# ---------------------------------------------------------------------------------------
# Sliding window
# ---------------------------------------------------------------------------------------


def identity(x):
    return x


def test_label_dice_equals_dice_of_each_organs_masks():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (20, 18, 16), generator=g)
    noise = torch.randint(0, 5, truth.shape, generator=g)
    pred = torch.where(torch.rand(truth.shape, generator=g) < 0.3, noise, truth)
    pred[pred == 3] = 0  # organ 3 never predicted: Dice 0 against a present truth
    truth[truth == 4] = 0
    pred[pred == 4] = 0  # organ 4 absent in both: Dice 1
    expected = [dice(pred == c, truth == c) for c in range(1, 5)]
    assert label_dice(pred, truth, 4) == pytest.approx(expected, abs=0)
    assert expected[2] == 0.0 and expected[3] == 1.0 and 0 < expected[0] < 1


def test_label_dice_beyond_uint8_range_and_bad_labels():
    truth = torch.arange(40).reshape(2, 4, 5) % 20
    pred = truth.clone()
    pred[0, 0, :3] = 0
    expected = [dice(pred == c, truth == c) for c in range(1, 20)]
    assert label_dice(pred, truth, 19) == pytest.approx(expected, abs=0)
    with pytest.raises(ValueError, match=r"0\.\.4"):
        label_dice(pred, truth, 4)
    with pytest.raises(ValueError, match=r"0\.\.19"):
        label_dice(pred - 1, truth, 19)


class FixedScores(torch.nn.Module):
    """A 'model' whose scores put a fixed label map on every window it is shown."""

    def __init__(self, labels: torch.Tensor, classes: int):
        super().__init__()
        self.scores = torch.nn.functional.one_hot(labels.long(), classes).movedim(-1, 0)[None].float()

    def forward(self, x):  # windows of the whole volume: the volume is the ROI here
        return self.scores.expand(x.shape[0], -1, -1, -1, -1)


def test_evaluate_scores_each_organ_against_its_own_truth():
    from data import ORGAN_ID, Case
    from eval import evaluate

    g = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 5, (16, 16, 16), generator=g, dtype=torch.uint8)
    pred = truth.clone()
    pred[:8][pred[:8] == ORGAN_ID["spleen"]] = 0  # spleen loses half, liver keeps all
    pred[truth == ORGAN_ID["pancreas"]] = ORGAN_ID["kidneys"]  # pancreas read as kidney
    case = Case("c", torch.zeros(16, 16, 16), truth, (1.0, 1.0, 1.0))
    organs = ["liver", "spleen", "pancreas", "kidneys"]
    # model channels: background, then the organs in `organs` order (= ORGAN_ID here)
    got = evaluate(FixedScores(pred, 5), [case], organs, (16, 16, 16))
    for organ in organs:
        expected = dice(pred == ORGAN_ID[organ], truth == ORGAN_ID[organ])
        assert got[organ] == [pytest.approx(expected, abs=1e-12)], organ
    assert got["liver"] == [1.0] and got["pancreas"] == [0.0] and 0 < got["spleen"][0] < 1


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("shape", [(20, 24, 16), (23, 17, 13)])
def test_sliding_window_with_identity_model_reproduces_the_volume(shape, overlap, blend):
    # any window placed back at the wrong offset, or a voxel no window covers, breaks the equality
    volume = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(0))
    out = sliding_window(identity, volume, (8, 8, 8), overlap=overlap, blend=blend)
    assert out.shape == volume.shape
    torch.testing.assert_close(out, volume, rtol=0, atol=1e-5)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_sliding_window_pads_a_small_volume_and_crops_back(blend):
    volume = torch.randn(1, 1, 5, 6, 3, generator=torch.Generator().manual_seed(1))
    out = sliding_window(identity, volume, (8, 8, 8), overlap=0.25, blend=blend)
    assert out.shape == volume.shape
    torch.testing.assert_close(out, volume, rtol=0, atol=1e-5)


def test_sliding_window_pads_with_pad_value():
    # a model that reports, at every voxel, how much of its window is padding
    def padding_fraction(x):
        frac = (x == -1024.0).float().mean(dim=(1, 2, 3, 4), keepdim=True)
        return frac.expand_as(x)

    volume = torch.zeros(1, 1, 4, 8, 8)
    out = sliding_window(padding_fraction, volume, (8, 8, 8), blend="constant")
    torch.testing.assert_close(out, torch.full_like(out, 0.5))


def test_sliding_window_feeds_predict_windows_of_exactly_the_roi():
    roi = (8, 6, 4)
    seen = []

    def recording(x):
        seen.append(tuple(x.shape))
        return x

    for shape in [(21, 13, 9), (5, 6, 3), (8, 6, 4)]:
        seen.clear()
        sliding_window(recording, torch.zeros(1, 1, *shape), roi, overlap=0.25, batch=3)
        assert seen
        assert all(s[2:] == roi and s[1] == 1 and 1 <= s[0] <= 3 for s in seen)


def test_sliding_window_without_overlap_tiles_exactly():
    # a volume that is a whole number of windows is covered once, with no redundant windows
    count = []

    def counting(x):
        count.append(x.shape[0])
        return x

    sliding_window(counting, torch.zeros(1, 1, 16, 16, 8), (8, 8, 8), overlap=0.0, blend="constant")
    assert sum(count) == 4


def test_sliding_window_output_channels_follow_the_model():
    # a segmentation model maps 1 HU channel to 1 + K scores
    def three_classes(x):
        return torch.cat([x, 2 * x, -x], dim=1)

    volume = torch.randn(1, 1, 19, 10, 9, generator=torch.Generator().manual_seed(2))
    out = sliding_window(three_classes, volume, (8, 8, 8), overlap=0.25)
    assert out.shape == (1, 3, 19, 10, 9)
    torch.testing.assert_close(out, torch.cat([volume, 2 * volume, -volume], dim=1), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Organ masks
# ---------------------------------------------------------------------------------------


def scores_where_modes_disagree():
    # (background, liver, spleen) scores at three voxels:
    #   voxel 0: background wins the argmax, yet both organs are above 0.5 on their own
    #   voxel 1: liver wins the argmax, yet no organ reaches 0.5
    #   voxel 2: spleen wins both ways (background low, so channel k + 1, not k, must be read)
    s = torch.tensor([[0.9, 0.1, 0.2], [0.6, 0.45, 0.3], [0.7, 0.3, 0.8]])
    return s.view(3, 3, 1, 1)


def test_organ_masks_argmax_gives_one_label_per_voxel():
    masks = organ_masks(scores_where_modes_disagree(), ("liver", "spleen"), independent=False)
    assert masks["liver"].flatten().tolist() == [False, True, False]
    assert masks["spleen"].flatten().tolist() == [False, False, True]


def test_organ_masks_independent_thresholds_each_organ_at_half():
    masks = organ_masks(scores_where_modes_disagree(), ("liver", "spleen"), independent=True)
    assert masks["liver"].flatten().tolist() == [True, False, False]
    assert masks["spleen"].flatten().tolist() == [True, False, True]


def test_organ_masks_follow_the_order_of_organs():
    # channel k + 1 belongs to organs[k], whatever the organs are called
    s = torch.tensor([0.0, 0.2, 0.9]).view(3, 1, 1, 1)
    masks = organ_masks(s, ("kidneys", "pancreas"), independent=False)
    assert not masks["kidneys"].any() and masks["pancreas"].all()


# ---------------------------------------------------------------------------------------
# Summaries and tables
# ---------------------------------------------------------------------------------------


def test_summarise_mean_and_population_std():
    s = summarise({"liver": [0.4, 0.6], "spleen": [0.1, 0.2, 0.6]})
    assert s["liver"]["mean"] == pytest.approx(0.5)
    assert s["liver"]["std"] == pytest.approx(0.1)  # the sample std would be 0.1414
    assert s["spleen"]["mean"] == pytest.approx(0.3)
    assert s["spleen"]["std"] == pytest.approx((((0.2**2) + (0.1**2) + (0.3**2)) / 3) ** 0.5)
    assert s["liver"]["cases"] == [0.4, 0.6]


def test_summarise_single_case_has_zero_std():
    s = summarise({"pancreas": [0.73]})
    assert s["pancreas"]["mean"] == pytest.approx(0.73)
    assert s["pancreas"]["std"] == 0.0


def table_row(table, name):
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {name} ")]
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_format_table_shows_mean_and_std_and_a_dash_for_missing_organs():
    rows = {"segviz": summarise({"liver": [0.4, 0.6]}), "other": summarise({"spleen": [0.25, 0.25]})}
    table = format_table(rows, ("liver", "spleen"))
    assert "0.500 ± 0.100" in table
    assert table_row(table, "segviz") == ["segviz", "0.500 ± 0.100", "—"]
    assert table_row(table, "other") == ["other", "—", "0.250 ± 0.000"]
    # header, separator, one line per model
    assert len(table.splitlines()) == 4
    assert [c.strip() for c in table.splitlines()[0].strip("|").split("|")] == ["model", "liver", "spleen"]


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


def test_load_checkpoint_reads_a_valid_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "weights": torch.arange(3.0)}, path)
    ckpt = load_checkpoint(str(path))
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert torch.equal(ckpt["weights"], torch.arange(3.0))


def assert_exit_2(path, capsys):
    """Loading `path` exits with status 2 after one line on stderr naming the file; returns that line."""
    with pytest.raises(SystemExit) as exc:
        load_checkpoint(str(path))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(path) in err and err.count("\n") == 1
    return err


def test_load_checkpoint_missing_file_exits_2(tmp_path, capsys):
    assert "no such file" in assert_exit_2(tmp_path / "absent.pt", capsys)


def test_load_checkpoint_truncated_file_exits_2(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "weights": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_exit_2(path, capsys)


def test_load_checkpoint_garbage_file_exits_2(tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(b"this is not a checkpoint\x00\xff" * 10)
    assert_exit_2(path, capsys)


def test_load_checkpoint_foreign_torch_file_exits_2(tmp_path, capsys):
    # readable by torch.load but not written by train.py
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    assert_exit_2(path, capsys)


def test_figures_without_matplotlib_say_so_in_one_line(monkeypatch, capsys):
    import sys

    import eval as ev

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
    from eval import box_plot

    def metrics(nodes, organs, level):
        return {"nodes": nodes, "dice": {o: {"cases": [level, level + 0.1, level - 0.1]} for o in organs}}

    two = {"segviz-2": metrics(2, ["liver", "spleen"], 0.8), "single-2": metrics(2, ["liver", "spleen"], 0.6)}
    three = {"segviz-3": metrics(3, ["liver", "spleen", "pancreas"], 0.7)}
    box_plot(two, tmp_path / "one.png")
    box_plot({**two, **three}, tmp_path / "two.png")
    (w1, h1), (w2, h2) = png_size(tmp_path / "one.png"), png_size(tmp_path / "two.png")
    # a pancreas column appears with the three-node runs, and a second row of panels
    assert w2 == pytest.approx(w1 * 3 / 2, rel=0.02) and h2 == pytest.approx(2 * h1, rel=0.02)
