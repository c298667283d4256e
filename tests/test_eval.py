"""Tests of eval.py: Dice, sliding-window inference, organ masks, result tables and checkpoint loading."""

import pytest
import torch

from eval import (
    CHECKPOINT_FORMAT,
    dice,
    format_table,
    importance_map,
    label_dice,
    load_checkpoint,
    organ_masks,
    sliding_window,
    summarise,
)
from metrics import surface_distances

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
    got = evaluate(FixedScores(pred, 5), [case], organs, (16, 16, 16))["classes"]["dice"]
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


def test_gaussian_importance_map_is_monais_gaussian_with_sigma_an_eighth_of_the_window():
    roi = (16, 12, 8)
    w = importance_map(roi, "gaussian", "cpu")
    assert w.shape == roi and float(w.max()) == 1.0
    profiles = [torch.exp(-0.5 * ((torch.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in roi]
    expected = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    expected = expected / expected.max()
    torch.testing.assert_close(w, expected.clamp(min=float(expected.min())), rtol=1e-6, atol=0)
    assert torch.equal(importance_map(roi, "constant", "cpu"), torch.ones(roi))


def test_windows_that_disagree_are_blended_by_their_weights():
    # two windows along x, overlapping on x = 4..7; the model answers 0 in the first and 1 in
    # the second, so the blend at each overlap voxel is the second window's share of the weight
    calls = []

    def which_window(x):
        calls.append(len(calls))
        return torch.full_like(x, float(calls[-1]))

    roi = (8, 4, 4)
    for blend in ("gaussian", "constant"):
        calls.clear()
        out = sliding_window(which_window, torch.zeros(1, 1, 12, 4, 4), roi, overlap=0.5, blend=blend, batch=1)
        assert len(calls) == 2
        w = importance_map(roi, blend, "cpu")[:, 0, 0]
        share = w[:4] / (w[4:] + w[:4])  # at x = 4..7: second window's voxels 0..3, first's 4..7
        torch.testing.assert_close(out[0, 0, :, 0, 0], torch.cat([torch.zeros(4), share, torch.ones(4)]))


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


def organ_probs_where_scorings_disagree():
    # (liver, spleen) probabilities of two binary heads at three voxels:
    #   voxel 0: both organs above 0.5 alone; merged, the more probable (spleen) wins
    #   voxel 1: no organ reaches 0.5: merged and alone, background
    #   voxel 2: spleen wins both ways (channel k is organs[k]: no background channel to skip)
    p = torch.tensor([[0.6, 0.45, 0.3], [0.9, 0.2, 0.8]])
    return p.view(2, 3, 1, 1)


def test_organ_masks_merged_gives_one_label_per_voxel():
    masks = organ_masks(organ_probs_where_scorings_disagree(), ("liver", "spleen"), "merged")
    assert masks["liver"].flatten().tolist() == [False, False, False]
    assert masks["spleen"].flatten().tolist() == [True, False, True]


def test_organ_masks_heads_threshold_each_organ_at_half():
    masks = organ_masks(organ_probs_where_scorings_disagree(), ("liver", "spleen"), "heads")
    assert masks["liver"].flatten().tolist() == [True, False, False]
    assert masks["spleen"].flatten().tolist() == [True, False, True]


def test_organ_masks_classes_take_the_argmax_with_background_first():
    # (background, kidneys, pancreas): channel k + 1 belongs to organs[k], whatever they are called
    s = torch.tensor([[0.5, 0.1], [0.2, 0.8], [0.3, 0.1]]).view(3, 2, 1, 1)
    masks = organ_masks(s, ("kidneys", "pancreas"), "classes")
    assert masks["kidneys"].flatten().tolist() == [False, True]
    assert masks["pancreas"].flatten().tolist() == [False, False]


def test_windows_that_disagree_are_blended_before_background_is_derived():
    # Two sliding windows see the same voxel: the left one calls it liver (0.8), the right one
    # spleen (0.8). Blended, each organ has 0.4: no organ claims the voxel, so it is background.
    # Deriving background per window (0.2 in both) and then blending would give it to an organ.
    from eval import predict_masks
    from segviz import MetaModel

    class Disagreeing(MetaModel):
        def __init__(self):
            torch.nn.Module.__init__(self)

        def forward(self, hu):  # organ probabilities by where each window sits (read from its HU)
            right = hu[:, 0, -1, 0, 0] > 0.5
            p = torch.stack([torch.where(right, 0.0, 0.8), torch.where(right, 0.8, 0.0)], dim=1)
            return p.view(-1, 2, 1, 1, 1).expand(-1, 2, *hu.shape[2:]).clone()

    from data import Case

    hu = torch.zeros(3, 1, 1)
    hu[2:] = 1.0  # the window at x 0..1 is "left", the one at x 1..2 "right"; voxel 1 is in both
    case = Case("c", hu, torch.zeros(3, 1, 1, dtype=torch.uint8), (1.0, 1.0, 1.0))
    masks = predict_masks(Disagreeing(), case, ("liver", "spleen"), (2, 1, 1), "merged", overlap=0.5,
                          blend="constant")
    assert masks["liver"].flatten().tolist() == [True, False, False]
    assert masks["spleen"].flatten().tolist() == [False, False, True]
    # the old rule, per window then blended, gave the disputed voxel to an organ
    old_background = torch.tensor([0.2, 0.2, 0.2])  # 1 - max per window, the same in both
    old = torch.stack([old_background, torch.tensor([0.8, 0.4, 0.0]), torch.tensor([0.0, 0.4, 0.8])])
    assert old.argmax(0).tolist()[1] != 0


def test_keep_largest_components_keeps_the_largest_not_the_smallest():
    from eval import keep_largest_components

    m = torch.zeros(20, 8, 8, dtype=torch.bool)
    m[0:2, :2, :2] = True  # 8 voxels
    m[5:11, :4, :4] = True  # 96 voxels: the largest
    m[14:17, :3, :3] = True  # 27 voxels
    one = keep_largest_components(m, 1)
    assert int(one.sum()) == 96 and one[5:11, :4, :4].all()
    two = keep_largest_components(m, 2)  # the kidneys' rule: the two largest
    assert int(two.sum()) == 96 + 27 and not two[0:2].any()
    assert torch.equal(keep_largest_components(m, 3), m)


def test_evaluate_scores_binary_heads_both_merged_and_alone():
    from data import ORGAN_ID, Case
    from eval import evaluate
    from segviz import MetaModel

    class Fixed(MetaModel):
        def __init__(self, probs):
            torch.nn.Module.__init__(self)
            self.probs = probs

        def forward(self, x):
            return self.probs.expand(x.shape[0], -1, -1, -1, -1)

    truth = torch.zeros(4, 1, 1, dtype=torch.uint8)
    truth[0] = ORGAN_ID["liver"]
    truth[1] = ORGAN_ID["spleen"]
    # voxel 1 is spleen; the liver head says 0.7 there, the spleen head 0.9: alone, the liver
    # head has a false positive; merged, spleen wins the voxel and liver is perfect
    probs = torch.tensor([[0.9, 0.7, 0.1, 0.1], [0.1, 0.9, 0.1, 0.1]]).view(1, 2, 4, 1, 1)
    case = Case("c", torch.zeros(4, 1, 1), truth, (1.0, 1.0, 1.0))
    got = evaluate(Fixed(probs), [case], ["liver", "spleen"], (4, 1, 1))
    assert got["merged"]["dice"] == {"liver": [1.0], "spleen": [1.0]}
    assert got["heads"]["dice"]["liver"] == [pytest.approx(2 / 3)] and got["heads"]["dice"]["spleen"] == [1.0]
    # the same scorings give the surface metrics: merged, perfect; the liver head alone reaches
    # the spleen's voxel, 1 mm beside its own
    assert got["merged"]["hd95"] == {"liver": [0.0], "spleen": [0.0]}
    assert got["heads"]["hd95"]["liver"] == [pytest.approx(0.95)]  # 95th percentile of (0, 1) and (0)
    assert got["heads"]["nsd"]["liver"] == [1.0]  # 1 mm is within the 2 mm tolerance


def test_evaluate_gives_hd95_and_nsd_in_the_cases_spacing_with_monais_empty_mask_rule(monkeypatch):
    import math

    import eval as ev
    from data import ORGAN_ID, Case

    truth = torch.zeros(12, 12, 12, dtype=torch.uint8)
    pred = truth.clone()
    truth[2, 2, 2] = ORGAN_ID["liver"]
    pred[5, 2, 2] = ORGAN_ID["liver"]  # 3 voxels along x at 2 mm: 6 mm from the truth
    truth[6:9, 6:9, 6:9] = ORGAN_ID["spleen"]
    pred[6:9, 6:9, 6:9] = ORGAN_ID["spleen"]
    pred[7, 7, 11] = ORGAN_ID["spleen"]  # a stray voxel 3 mm beyond the box's top surface
    truth[0, 10, 10] = ORGAN_ID["pancreas"]  # missed entirely; kidneys absent from both
    case = Case("c", torch.zeros(12, 12, 12), truth, (2.0, 1.0, 1.0))
    calls = []
    monkeypatch.setattr(ev, "surface_distances", lambda *a: calls.append(a) or surface_distances(*a))
    got = ev.evaluate(FixedScores(pred, 5), [case], ["liver", "spleen", "pancreas", "kidneys"], (12, 12, 12))
    hd, nsd = got["classes"]["hd95"], got["classes"]["nsd"]
    assert hd["liver"] == [pytest.approx(6.0)] and nsd["liver"] == [0.0]
    # the box's 26 surface voxels match both ways; of 53 surface voxels only the stray is off
    assert hd["spleen"] == [0.0] and nsd["spleen"] == [pytest.approx(52 / 53)]
    assert math.isnan(hd["pancreas"][0]) and nsd["pancreas"] == [0.0]  # one mask empty
    assert math.isnan(hd["kidneys"][0]) and math.isnan(nsd["kidneys"][0])  # both empty
    assert len(calls) == 4 and all(c[2] == (2.0, 1.0, 1.0) for c in calls)  # one per organ, the case's spacing
    # validation reads Dice alone and computes no distance
    calls.clear()
    only = ev.evaluate(FixedScores(pred, 5), [case], ["liver", "spleen"], (12, 12, 12), surface=False)
    assert set(only["classes"]) == {"dice"} and not calls


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


def test_summarise_leaves_undefined_values_out_of_the_mean_and_counts_them():
    s = summarise({"liver": [2.0, float("nan"), 4.0], "spleen": [float("nan")] * 2, "pancreas": [0.5]})
    assert s["liver"] == {"mean": 3.0, "std": 1.0, "cases": [2.0, None, 4.0], "nan": 1}
    assert s["spleen"] == {"mean": None, "std": None, "cases": [None, None], "nan": 2}
    assert "nan" not in s["pancreas"]  # Dice is always defined: its summary is as before


def test_format_table_shows_how_many_cases_had_no_value():
    from eval import format_metric_tables

    hd = summarise({"liver": [10.0, float("nan"), 14.0], "spleen": [float("nan")]})
    table = format_table({"segviz": hd}, ("liver", "spleen"), digits=1)
    assert table_row(table, "segviz") == ["segviz", "12.0 ± 2.0 (1 nan)", "nan (1 nan)"]
    both = format_metric_tables({"segviz": {"dice": summarise({"liver": [0.5]}), "hd95": hd}}, ("liver",))
    dice_part, hd_part = both.split("\n\n")
    assert "0.500 ± 0.000" in dice_part and hd_part.startswith("HD95 in mm") and "12.0 ± 2.0 (1 nan)" in hd_part


def test_a_checkpoint_is_tested_again_with_the_sliding_window_its_run_was_tested_with():
    import argparse

    from eval import sliding_settings

    paper = {"patch": [128, 128, 32], "roi": [160, 160, 160], "blend": "constant", "eval_overlap": 0.5}
    assert sliding_settings(paper) == ([160, 160, 160], 0.5, "constant")
    given = argparse.Namespace(overlap=0.0)
    assert sliding_settings(paper, given) == ([160, 160, 160], 0.0, "constant")
    unset = argparse.Namespace(overlap=None)
    assert sliding_settings(paper, unset) == ([160, 160, 160], 0.5, "constant")
    older = {"patch": [48, 48, 32], "roi": None}  # before roi/blend/overlap were recorded
    assert sliding_settings(older, unset) == ([48, 48, 32], 0.25, "gaussian")


def test_a_checkpoints_cache_folder_is_found_in_older_checkpoints_too():
    from eval import checkpoint_cache

    assert checkpoint_cache({"cache": "/new", "seed": 0}) == "/new"
    assert checkpoint_cache({"cache_dir": "/old", "seed": 0}) == "/old"  # before the Config dataclass
    assert checkpoint_cache({"seed": 0}) is None
