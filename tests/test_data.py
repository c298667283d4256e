"""The data vocabulary: intensity windows, the sites of each federation size."""

import torch

import data


def test_window_maps_lo_to_0_hi_to_1_and_clips():
    lo, hi = data.WINDOWS["liver"]
    hu = torch.tensor([lo - 500, lo, (lo + hi) / 2, hi, hi + 500])
    out = data.window(hu, (lo, hi))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert hu[0] == lo - 500  # the input is left alone


def test_window_is_linear_inside():
    out = data.window(torch.tensor([-100.0, 0.0, 100.0, 200.0]), (-200.0, 200.0))
    torch.testing.assert_close(out, torch.tensor([0.25, 0.5, 0.75, 1.0]))


def test_sites_join_in_the_papers_order_and_each_labelled_its_own_organ():
    assert [data.NODE_SITES[n] for n in (1, 2, 3, 4)] == [
        ("liver",), ("liver", "spleen"), ("liver", "spleen", "pancreas"), data.ORGANS]
    assert all(data.SITE_ORGAN[s] == s for s in data.ORGANS)
    # a binary site model sees its own site's window, a multi-class model the pooled one everywhere
    assert data.site_windows(("liver", "kidneys"), True) == {
        "liver": (-200.0, 200.0),
        "kidneys": (-79.0, 304.0),
    }
    assert set(data.site_windows(("liver", "kidneys"), False).values()) == {(-200.0, 304.0)}
