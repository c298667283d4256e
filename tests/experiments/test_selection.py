"""Choosing on validation: eval-options rescores the validation cases training reported, from the
checkpoints, on the phantom and on real data (whose held-out cases must still be there)."""

import json

import pytest
import torch

from helpers import SMALL, run


@pytest.mark.slow
def test_eval_options_rescores_the_validation_that_training_reported(tmp_path, cache):
    # eval-options rebuilds each site's model from model.pt and its validation cases from the
    # saved config; under the preset's own options it must give training's validation Dice
    from experiments.selection import eval_options_table, validation_table

    cand = tmp_path / "cand"
    result = run(
        "train.py",
        "--nodes",
        "2",
        "--rounds",
        "6",
        "--local-steps",
        "2",
        "--max-cases",
        "2",
        "--val-every",
        "6",
        "--no-test",
        "--seeds",
        "0",
        "1",
        "--out",
        str(cand),
        "--cache",
        str(cache),
        *SMALL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    validation = [
        json.loads((cand / f"seed-{s}" / "metrics.json").read_text())["validation"][-1]
        for s in (0, 1)
    ]
    # something was learnt: equal numbers mean something
    assert all(v["liver"] > 0.05 for v in validation)
    trained = validation_table([str(cand)]).splitlines()[-1].split(" | ")[-1].strip(" |")
    table = eval_options_table([str(cand)])
    rows = {tuple(r[1:3]): r[-1] for r in option_rows(table)}
    # the preset's Gaussian blending with the clean-up
    assert rows[("gaussian", "largest")] == trained
    # constant blending scores the same models differently
    assert rows[("constant", "largest")] != trained
    # --cases draws the phantom's validation cases afresh: as many as training's are training's own
    assert eval_options_table([str(cand)], 2) == table
    assert option_rows(eval_options_table([str(cand)], 3)) != option_rows(table)


def option_rows(table: str) -> list[list[str]]:
    """The rows of an eval-options table, cells stripped (candidate, blending, clean-up, sites...,
    mean)."""
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


@pytest.mark.slow
def test_eval_options_on_real_data_reads_the_held_out_cases_again(tmp_path):
    # real data: eval-options finds the validation cases in the folders the run trained on,
    # the same ones (by name) the run held out, and re-scores training's validation Dice
    from experiments.selection import eval_options_table, validation_table
    from realdata import synth

    root, cand = tmp_path / "archives", tmp_path / "cand"
    synth.generate(str(root), cases=3, test_cases=1, seed=0, coarsen=3.0, log=lambda s: None)
    result = run(
        "train.py",
        "--nodes",
        "2",
        "--data-root",
        str(root),
        "--rounds",
        "4",
        "--local-steps",
        "2",
        "--spacing",
        "6",
        "6",
        "6",
        "--val-every",
        "4",
        "--no-test",
        "--seeds",
        "0",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(cand),
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    trained = validation_table([str(cand)]).splitlines()[-1].split(" | ")[-1].strip(" |")
    cfg = torch.load(cand / "seed-0" / "model.pt", weights_only=True)["config"]
    # the real-data recipe's test-time options
    used = (cfg["blend"], "largest" if cfg["largest"] else "none")
    assert {tuple(r[1:3]): r[-1] for r in option_rows(eval_options_table([str(cand)]))}[
        used
    ] == trained
    # real data: the split is the split
    more = run("-m", "experiments", "eval-options", str(cand), "--cases", "4")
    assert more.returncode == 2 and len(more.stderr.strip().splitlines()) == 1, more.stderr
    assert "--cases" in more.stderr and "held-out split" in more.stderr

    # a run whose held-out cases are not the ones the folders give now is refused, in one line
    ckpt_path = cand / "seed-0" / "model.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    held = ckpt["source"]["validation"]["spleen"]
    ckpt["source"]["validation"]["spleen"] = ["spleen_other"]
    torch.save(ckpt, ckpt_path)
    moved = run("-m", "experiments", "eval-options", str(cand))
    assert moved.returncode == 2 and len(moved.stderr.strip().splitlines()) == 1, moved.stderr
    assert "no longer hold the validation cases" in moved.stderr
    # and so is a validation case that is gone, named
    (root / "Task09_Spleen" / "imagesTr" / f"{held[0]}.nii.gz").unlink()
    gone = run("-m", "experiments", "eval-options", str(cand))
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    assert gone.stderr.startswith("error: eval-options:") and f"{held[0]}.nii.gz" in gone.stderr
    # a run that held nothing out (real data without --val-every) has nothing to re-score
    ckpt["config"]["val_split"], ckpt["source"]["validation"] = "0", {"liver": [], "spleen": []}
    torch.save(ckpt, ckpt_path)
    none = run("-m", "experiments", "eval-options", str(cand))
    assert none.returncode == 2 and "held out no validation cases" in none.stderr, none.stderr


