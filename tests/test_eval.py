"""Evaluation: sliding-window inference, organ masks from the blended output, the clean-up, and
scoring through the one inference path that training, validation and eval.py share."""

from dataclasses import replace

import pytest
import torch

from data import Case
from eval import evaluate, importance_map, organ_masks, predict_scores, sliding_window
from metrics import dice, surface_distances
from settings import Config, resolve


def cfg_for(roi, **kw):
    """The test-time settings evaluate reads, for a window of `roi` on the CPU."""
    return replace(Config(), roi=tuple(roi), device="cpu", largest=False, **kw)


# ---------------------------------------------------------------------------------------
# Sliding window
# ---------------------------------------------------------------------------------------


def identity(x):
    return x


class FixedScores(torch.nn.Module):
    """A 'model' whose scores put a fixed label map on every window it is shown."""

    def __init__(self, labels: torch.Tensor, classes: int):
        super().__init__()
        self.scores = (
            torch.nn.functional.one_hot(labels.long(), classes).movedim(-1, 0)[None].float()
        )

    def forward(self, x):  # windows of the whole volume: the volume is the ROI here
        return self.scores.expand(x.shape[0], -1, -1, -1, -1)


def test_evaluate_scores_each_organ_against_its_own_truth():
    from data import ORGAN_ID, Case

    g = torch.Generator().manual_seed(1)
    truth = torch.randint(0, 5, (16, 16, 16), generator=g, dtype=torch.uint8)
    pred = truth.clone()
    pred[:8][pred[:8] == ORGAN_ID["spleen"]] = 0  # spleen loses half, liver keeps all
    pred[truth == ORGAN_ID["pancreas"]] = ORGAN_ID["kidneys"]  # pancreas read as kidney
    case = Case("c", torch.zeros(16, 16, 16), truth, (1.0, 1.0, 1.0))
    organs = ["liver", "spleen", "pancreas", "kidneys"]
    # model channels: background, then the organs in `organs` order (= ORGAN_ID here)
    got = evaluate(FixedScores(pred, 5), [case], organs, ("classes",), cfg_for((16, 16, 16)))[
        "classes"
    ]["dice"]
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
        out = sliding_window(
            which_window, torch.zeros(1, 1, 12, 4, 4), roi, overlap=0.5, blend=blend, batch=1
        )
        assert len(calls) == 2
        w = importance_map(roi, blend, "cpu")[:, 0, 0]
        share = w[:4] / (w[4:] + w[:4])  # at x = 4..7: second window's voxels 0..3, first's 4..7
        torch.testing.assert_close(
            out[0, 0, :, 0, 0], torch.cat([torch.zeros(4), share, torch.ones(4)])
        )


def test_sliding_window_output_channels_follow_the_model():
    # a segmentation model maps 1 HU channel to 1 + K scores
    def three_classes(x):
        return torch.cat([x, 2 * x, -x], dim=1)

    volume = torch.randn(1, 1, 19, 10, 9, generator=torch.Generator().manual_seed(2))
    out = sliding_window(three_classes, volume, (8, 8, 8), overlap=0.25)
    assert out.shape == (1, 3, 19, 10, 9)
    torch.testing.assert_close(
        out, torch.cat([volume, 2 * volume, -volume], dim=1), rtol=0, atol=1e-5
    )


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


class Disagreeing(torch.nn.Module):
    """Two binary heads whose organ probabilities depend on which sliding window they see: the
    window at x 0..1 calls both voxels liver (0.8), the window at x 1..2 spleen (0.8)."""

    def forward(self, hu):
        right = hu[:, 0, -1, 0, 0] > 0.5  # read from the window's HU: 1 only in the right one
        p = torch.stack([torch.where(right, 0.0, 0.8), torch.where(right, 0.8, 0.0)], dim=1)
        return p.view(-1, 2, 1, 1, 1).expand(-1, 2, *hu.shape[2:]).clone()


def test_windows_that_disagree_are_blended_before_background_is_derived():
    # Voxel 1 lies in both windows. Blended, each organ has 0.4 there: no organ claims it, so it
    # is background, and it is background in the truth. Deriving background per window (0.2 in
    # both) and then blending would give it to an organ: liver Dice 2/3 instead of 1. The test
    # goes through evaluate, the path training, validation and eval.py take.
    from data import ORGAN_ID, Case

    hu = torch.zeros(3, 1, 1)
    hu[2:] = 1.0
    truth = torch.tensor([ORGAN_ID["liver"], 0, ORGAN_ID["spleen"]], dtype=torch.uint8).view(
        3, 1, 1
    )
    case = Case("c", hu, truth, (1.0, 1.0, 1.0))
    cfg = cfg_for((2, 1, 1), overlap=0.5, blend="constant")
    got = evaluate(Disagreeing(), [case], ("liver", "spleen"), ("merged",), cfg)
    assert got["merged"]["dice"] == {"liver": [1.0], "spleen": [1.0]}
    # the rule per window, then blended, gives the disputed voxel to an organ
    old_background = torch.tensor([0.2, 0.2, 0.2])  # 1 - max per window, the same in both
    old = torch.stack(
        [old_background, torch.tensor([0.8, 0.4, 0.0]), torch.tensor([0.0, 0.4, 0.8])]
    )
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

    class Fixed(torch.nn.Module):
        def __init__(self, probs):
            super().__init__()
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
    got = evaluate(
        Fixed(probs), [case], ["liver", "spleen"], ("merged", "heads"), cfg_for((4, 1, 1))
    )
    assert got["merged"]["dice"] == {"liver": [1.0], "spleen": [1.0]}
    assert got["heads"]["dice"]["liver"] == [pytest.approx(2 / 3)] and got["heads"]["dice"][
        "spleen"
    ] == [1.0]
    # the same scorings give the surface metrics: merged, perfect; the liver head alone reaches
    # the spleen's voxel, 1 mm beside its own
    assert got["merged"]["hd95"] == {"liver": [0.0], "spleen": [0.0]}
    # 95th percentile of (0, 1) and (0)
    assert got["heads"]["hd95"]["liver"] == [pytest.approx(0.95)]
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
    monkeypatch.setattr(
        ev, "surface_distances", lambda *a: calls.append(a) or surface_distances(*a)
    )
    organs = ["liver", "spleen", "pancreas", "kidneys"]
    got = ev.evaluate(FixedScores(pred, 5), [case], organs, ("classes",), cfg_for((12, 12, 12)))
    hd, nsd = got["classes"]["hd95"], got["classes"]["nsd"]
    assert hd["liver"] == [pytest.approx(6.0)] and nsd["liver"] == [0.0]
    # the box's 26 surface voxels match both ways; of 53 surface voxels only the stray is off
    assert hd["spleen"] == [0.0] and nsd["spleen"] == [pytest.approx(52 / 53)]
    assert math.isnan(hd["pancreas"][0]) and nsd["pancreas"] == [0.0]  # one mask empty
    assert math.isnan(hd["kidneys"][0]) and math.isnan(nsd["kidneys"][0])  # both empty
    # one per organ, the case's spacing
    assert len(calls) == 4 and all(c[2] == (2.0, 1.0, 1.0) for c in calls)
    # validation reads Dice alone and computes no distance
    calls.clear()
    only = ev.evaluate(
        FixedScores(pred, 5),
        [case],
        ["liver", "spleen"],
        ("classes",),
        cfg_for((12, 12, 12)),
        surface=False,
    )
    assert set(only["classes"]) == {"dice"} and not calls




@pytest.mark.parametrize("amp", [False, True])
def test_amp_reaches_the_windows_passes_and_the_blend_stays_float32(amp):
    seen = []

    def model(x):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return torch.nn.functional.conv3d(x, torch.ones(2, 1, 1, 1, 1))

    case = Case("c", torch.rand(20, 20, 12), torch.zeros(20, 20, 12, dtype=torch.uint8),
                (1.0, 1.0, 1.0))
    cfg = resolve({"roi": (16, 16, 8), "amp": amp, "device": "cpu"})
    scores = predict_scores(model, case, cfg)
    assert seen and all(on == amp for on, _ in seen)
    assert not amp or all(dtype == torch.bfloat16 for _, dtype in seen)
    assert scores.dtype == torch.float32 and scores.shape == (2, 20, 20, 12)
    # the same windows, blended: bfloat16's rounding apart, the float32 result
    exact = predict_scores(model, case, resolve({"roi": (16, 16, 8), "device": "cpu"}))
    torch.testing.assert_close(scores, exact, rtol=1e-2, atol=1e-2)
