"""Variants of a run that are not SegViz itself: the marginal loss, names that never take a plain
run's folder, and variants that do not fit refused before anything is written."""

import os

import torch

import train
from helpers import run


def test_marginal_loss_is_dice_ce_when_every_organ_is_labelled():
    from experiments.variants import marginal_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 6, 4)
    target = torch.randint(0, 5, (2, 6, 6, 4))
    torch.testing.assert_close(
        marginal_loss(logits, target, [1, 2, 3, 4]), train.dice_ce_loss(logits, target)
    )


def test_marginal_loss_never_teaches_an_unlabelled_organ_as_background():
    from experiments.variants import marginal_loss

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6, 6, 4, requires_grad=True)
    target = torch.randint(0, 2, (2, 6, 6, 4))  # a liver site: background 0 and liver 1 only
    loss = marginal_loss(logits, target, [1])
    loss.backward()
    g, p = logits.grad, torch.softmax(logits.detach(), 1)
    # within the merged group {background, spleen, pancreas, kidneys} the gradient only moves
    # the group's total: each member's gradient is proportional to its probability
    for organ in (2, 3, 4):
        torch.testing.assert_close(
            g[:, organ] * p[:, 0], g[:, 0] * p[:, organ], atol=1e-9, rtol=1e-5
        )
    # so swapping an unlabelled organ's logit with background's leaves the loss unchanged...
    swapped = logits.detach().clone()
    swapped[:, [0, 2]] = swapped[:, [2, 0]]
    torch.testing.assert_close(marginal_loss(swapped, target, [1]), loss.detach())
    # ...which the ordinary loss, teaching the spleen as background, does not
    assert not torch.allclose(
        train.dice_ce_loss(swapped, target), train.dice_ce_loss(logits.detach(), target)
    )


def test_a_variant_run_never_takes_a_plain_runs_folder(monkeypatch, tmp_path):
    from experiments import variants

    monkeypatch.chdir(tmp_path)  # the default out folders are checked for writability here

    made = {}
    monkeypatch.setattr(
        variants, "train_seeds", lambda cfg, seeds, **kw: made.setdefault("cfg", cfg) and 0
    )
    variants.main(["--mode", "segviz", "--dropout", "0.2", "--aggregate", "median"])
    assert made["cfg"].out == os.path.join("runs", "segviz-dropout0.2-median-4")
    names = {}
    for argv in (
        ["--mode", "fedavg", "--marginal"],
        ["--mode", "central", "--oracle"],
        ["--weighted", "--fedbn"],
        ["--dp-clip", "1", "--dp-noise", "0.01"],
        [],
    ):
        made.clear()
        variants.main(argv)
        names[made["cfg"].out] = argv
    assert sorted(names) == sorted(
        os.path.join("runs", n)
        for n in (
            "fedavg-marginal-4",
            "oracle-4",
            "segviz-weighted-fedbn-4",
            "segviz-dpclip1.0-dpnoise0.01-4",
            "segviz-4",
        )
    )


def test_variants_that_do_not_fit_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    both = run(
        "-m",
        "experiments",
        "train",
        "--mode",
        "central",
        "--oracle",
        "--marginal",
        "--out",
        str(out),
    )
    assert both.returncode == 2 and "--oracle and --marginal cannot be combined" in both.stderr
    suite = run("-m", "experiments", "suite", "--out", str(out), "--dropout", "0.2")
    assert suite.returncode == 2 and "python -m experiments train" in suite.stderr
    assert not out.exists()
