"""ConDistFL's losses and its training: the distillation term is MONAI's masked Dice of the two
models' conditional probabilities at temperature 2, nothing where the site's label or the global
model says "the site's own organ", zero where a confident global model and the local model
agree; the global model does not move in a local step; with the distillation weighted 0 a run
is bitwise FedAvg with the marginal loss."""

import json

import pytest
import torch

import fl
import train
from experiments import condist
from experiments.marginal import marginal_loss
from helpers import tiny

LIVER = [1]  # the liver site labels class 1 of background, liver, spleen, pancreas, kidneys


def batch(seed, classes=5, shape=(2, 6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], classes, *shape[1:], generator=g) * 2
    teacher = torch.randn(shape[0], classes, *shape[1:], generator=g) * 2
    target = (torch.rand(shape, generator=g) < 0.3).long()  # a liver site: background 0, liver 1
    return logits, teacher, target


def test_the_distillation_term_is_monais_masked_dice_of_the_conditional_probabilities():
    monai = pytest.importorskip("monai")
    logits, teacher, target = batch(0)
    # the conditional probabilities of background and the organs the site did not label are a
    # softmax at temperature 2 over those classes alone (the site's own class drops out)
    others = [0, 2, 3, 4]
    expected_student = torch.softmax(logits[:, others] / 2, dim=1)
    torch.testing.assert_close(condist.conditional_probabilities(logits, LIVER), expected_student,
                               rtol=1e-4, atol=1e-5)
    # the voxels compared: neither the label nor the global model's argmax is the liver
    mask = ((target != 1) & (teacher.argmax(1) != 1))[:, None].float()
    assert 0 < mask.mean() < 1
    reference = monai.losses.MaskedDiceLoss(include_background=True, smooth_nr=0.0, smooth_dr=1e-5,
                                            batch=True)
    expected = reference(condist.conditional_probabilities(logits, LIVER),
                         condist.conditional_probabilities(teacher, LIVER), mask=mask)
    torch.testing.assert_close(condist.condist_loss(logits, teacher, target, LIVER), expected,
                               rtol=1e-5, atol=1e-6)


def test_the_term_is_zero_where_a_confident_global_model_and_the_local_model_agree():
    _, teacher, target = batch(1)
    confident = teacher * 1000  # one-hot conditional probabilities, even at temperature 2
    # zero but for the reference's two small constants (1e-5 beside the conditional
    # probabilities' denominator and the Dice's)
    assert float(condist.condist_loss(confident.clone(), confident, target, LIVER)) < 1e-4
    # soft agreement: the Dice of a distribution with itself, what the reference's Dice gives
    soft = float(condist.condist_loss(teacher.clone(), teacher, target, LIVER))
    assert 0 < soft < 1
    # and disagreement costs more than confident agreement
    assert float(condist.condist_loss(-confident, confident, target, LIVER)) > 0.5


def test_the_site_s_own_organ_is_left_to_its_label():
    logits, teacher, target = batch(2)
    base = condist.condist_loss(logits, teacher, target, LIVER)
    # what either model says about the site's own class changes nothing: it is conditioned away
    shifted = logits.clone()
    shifted[:, 1] += torch.randn(shifted[:, 1].shape)
    mask = condist.distillation_mask(teacher, target, LIVER)
    torch.testing.assert_close(condist.condist_loss(shifted, teacher, target, LIVER), base,
                               rtol=2e-3, atol=2e-4)
    # the student's answer on voxels labelled liver, or called liver by the global model, counts
    # for nothing
    outside = logits.clone()
    outside[:, 2:] += 5 * (1 - mask)
    torch.testing.assert_close(condist.condist_loss(outside, teacher, target, LIVER), base)


def test_the_weight_grows_linearly_from_the_first_round_to_the_last():
    assert condist.weight_at(0, 100) == pytest.approx(0.01)
    assert condist.weight_at(99, 100) == pytest.approx(1.0)
    assert condist.weight_at(33, 100) == pytest.approx(0.01 + 0.99 / 3)
    assert condist.weight_at(0, 1) == 1.0


def federation(tmp_path):
    from data import Case

    g = torch.Generator().manual_seed(0)
    cases = {}
    for i, site in enumerate(("liver", "spleen")):
        label = (torch.rand(48, 48, 32, generator=g) > 0.9).to(torch.uint8) * (i + 1)
        hu = torch.rand(48, 48, 32, generator=g) * 300
        cases[site] = [Case(f"{site}-0", hu, label, (3.0,) * 3)]
    from settings import resolve

    cfg = resolve({"nodes": 2, "mode": "fedavg", "channels": (4, 8, 16, 32), "patch": (32, 32, 16),
                   "out": str(tmp_path)})
    return train.build_run(cfg, cases, train.Extensions(prepare=condist.prepare))


def test_a_local_step_leaves_the_global_model_as_it_was(tmp_path):
    run = federation(tmp_path)
    client = run.clients[0]
    seen = []
    real_loss = client.loss_fn

    def recording(logits, target):
        seen.append(target[1].clone())
        return real_loss(logits, target)

    client.loss_fn = recording
    start = {k: v.clone() for k, v in client.model_state.items()}
    fl.local_train(run.model, run.optimizer, client, 3)
    # the teacher's logits of the first and last step are the same model's (the start's):
    # recompute them from the start weights on a fresh network
    assert not all(torch.equal(start[k], client.model_state[k]) for k in start)
    assert len(seen) == 3
    teacher = client.next_batch.teacher
    assert all(torch.equal(teacher.state_dict()[k], start[k]) for k in start)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # the next round starts from the average: the teacher follows
    fl.federated_round(run.model, run.optimizer, run.clients, 1, run.keys)
    fl.local_train(run.model, run.optimizer, run.clients[1], 1)
    assert not all(torch.equal(teacher.state_dict()[k], start[k]) for k in start)


def test_the_marginal_loss_is_what_remains_with_the_distillation_weighted_zero(monkeypatch):
    logits, teacher, target = batch(3)
    monkeypatch.setattr(condist, "WEIGHT_RANGE", (0.0, 0.0))
    loss = condist.site_loss(logits, (target, teacher), LIVER, [5], 10)
    torch.testing.assert_close(loss, marginal_loss(logits, target, LIVER))


@pytest.mark.slow
def test_a_condistfl_run_trains_evaluates_and_names_itself(tmp_path, cache):
    out = tmp_path / "run" / "seed-0"  # each seed's run is in OUT/seed-S
    result = tiny("fedavg", out.parent, cache, "--condist")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "condistfl-2" and metrics["extensions"] == {"condist": True}
    assert all(0 <= metrics["dice"][o]["mean"] <= 1 for o in ("liver", "spleen"))


@pytest.mark.slow
def test_with_the_distillation_weighted_zero_a_run_is_bitwise_fedavg_with_the_marginal_loss(
        tmp_path, cache, monkeypatch):
    # the teacher's forward passes and its construction leave the training untouched
    from experiments.variants import extensions
    from settings import resolve

    monkeypatch.setattr(condist, "WEIGHT_RANGE", (0.0, 0.0))
    base = {"nodes": 2, "mode": "fedavg", "rounds": 2, "local_steps": 2, "max_cases": 1,
            "spacing": (6.0, 6.0, 6.0), "cache": str(cache), "test": False}
    states = []
    for name, variant in (("marginal", {"marginal": True}), ("condist", {"condist": True})):
        cfg = resolve({**base, "out": str(tmp_path / name)})
        train.train(cfg, extensions(cfg, variant))
        ckpt = torch.load(tmp_path / name / "model.pt", weights_only=True)
        states.append(ckpt["states"]["global"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
