"""Plug-ins for the federated round: screening updates, robust aggregation, differential
privacy; each a function passed into fl.federated_round."""

import torch
from torch import nn

import fl
from experiments import robust


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def make_clients(model, optimizer, n=3):
    clients = []
    for i in range(n):
        gen = torch.Generator().manual_seed(100 + i)
        # each client sees different data, so local training moves them apart
        def batch(g=gen, shift=float(i)):
            x = torch.randn(8, 3, generator=g) + shift
            return x, (x.sum(1) > shift * 3).long()

        clients.append(
            fl.new_client(
                f"c{i}", model, optimizer, batch, nn.functional.cross_entropy, weight=i + 1
            )
        )
    return clients


def poisoned_round(poison, guard, n=3, aggregate=fl.average):
    """One round in which the last client's shared weights are replaced by `poison(weights)`."""
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt, n)
    shared = ["0.weight", "0.bias"]
    honest = []

    def record(states, weights):
        honest.append([dict(s) for s in states])
        return aggregate(states, weights)

    real_train = fl.local_train

    def train_then_poison(model, optimizer, client, steps, progress=None):
        loss = real_train(model, optimizer, client, steps, progress)
        if client is clients[-1]:
            client.model_state["0.weight"] = poison(client.model_state["0.weight"])
        return loss

    fl.local_train = train_then_poison
    try:
        report = fl.federated_round(model, opt, clients, 2, shared, robust.combiner(record, guard))
    finally:
        fl.local_train = real_train
    return clients, report, honest


def test_an_update_with_nan_is_refused_and_the_others_averaged():
    def nan(w):
        w = w.clone()
        w[0, 0] = float("nan")
        return w

    clients, report, seen = poisoned_round(nan, robust.Guard())
    assert list(report.refused) == ["c2"] and "NaN or inf in 0.weight" in report.refused["c2"]
    assert len(seen[0]) == 2
    assert all(torch.isfinite(c.model_state["0.weight"]).all() for c in clients)
    expected = fl.average(seen[0])
    assert torch.equal(clients[2].model_state["0.weight"], expected["0.weight"]), (
        "the refused client is reset"
    )


def test_an_outlying_update_norm_is_refused_by_the_median_rule_and_by_the_absolute_limit():
    _, report, seen = poisoned_round(lambda w: w * 1000, robust.Guard(factor=10.0))
    assert list(report.refused) == ["c2"] and "median of the others" in report.refused["c2"]
    assert len(seen[0]) == 2
    _, report, _ = poisoned_round(lambda w: w * 1000, robust.Guard(max_norm=5.0))
    assert list(report.refused) == ["c2"] and "--max-update-norm" in report.refused["c2"]
    # honest updates pass the default rule
    _, report, seen = poisoned_round(lambda w: w, robust.Guard())
    assert report.refused == {} and len(seen[0]) == 3


def test_every_update_refused_keeps_last_rounds_weights():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt, 2)
    start = clients[0].model_state["0.weight"].clone()
    guard = robust.Guard(max_norm=1e-9)
    report = fl.federated_round(model, opt, clients, 2, ["0.weight"], robust.combiner(guard=guard))
    assert set(report.refused) == {"c0", "c1"}
    assert all(torch.equal(c.model_state["0.weight"], start) for c in clients)


def test_median_and_trimmed_mean_on_known_values():
    s = [{"w": torch.tensor(w), "n": torch.tensor(n)}
         for w, n in (([1.0, 10.0], 1), ([2.0, 20.0], 2), ([100.0, 30.0], 9), ([3.0, -1e6], 4))]
    torch.testing.assert_close(robust.median(s)["w"], torch.tensor([2.5, 15.0]))
    assert int(robust.median(s)["n"]) == 3  # (2 + 4) / 2
    torch.testing.assert_close(robust.median(s[:3])["w"], torch.tensor([2.0, 20.0]))
    # four values: drop one at each end, mean of the middle two
    torch.testing.assert_close(robust.trimmed_mean(s)["w"], torch.tensor([2.5, 15.0]))
    five = [*s, {"w": torch.tensor([4.0, 40.0]), "n": torch.tensor(0)}]
    torch.testing.assert_close(robust.trimmed_mean(five)["w"], torch.tensor([3.0, 20.0]))


def test_robust_aggregation_shrugs_off_a_poisoned_client_the_mean_does_not():
    _, _, seen_mean = poisoned_round(lambda w: w + 50, None)
    clients, _, _ = poisoned_round(lambda w: w + 50, None, aggregate=robust.median)
    honest = [s["0.weight"] for s in seen_mean[0][:2]]
    assert clients[0].model_state["0.weight"].abs().max() < max(h.abs().max() for h in honest) + 1
    clients, _, _ = poisoned_round(lambda w: w + 50, None)
    assert clients[0].model_state["0.weight"].abs().max() > 10


def test_dp_clips_each_update_and_adds_noise_of_the_stated_size():
    ref = {"w": torch.zeros(100_000), "n": torch.tensor(3)}
    big = {"w": torch.full((100_000,), 0.1), "n": torch.tensor(3)}
    clipped = robust.clip_update(big, ref, clip=2.0)
    assert abs(robust.update_norm(clipped, ref) - 2.0) < 1e-6
    small = {"w": torch.full((100_000,), 1e-4), "n": torch.tensor(3)}
    assert torch.equal(robust.clip_update(small, ref, clip=2.0)["w"], small["w"])
    noisy = robust.add_noise(ref, 0.5, torch.Generator().manual_seed(0))
    assert abs(float(noisy["w"].std()) - 0.5) < 0.01 and int(noisy["n"]) == 3


def test_dp_round_moves_the_global_weights_by_at_most_clip_plus_noise():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-1)
    clients = make_clients(model, opt)
    keys = ["0.weight", "0.bias"]
    start = {k: clients[0].model_state[k].clone() for k in keys}
    privacy = robust.Privacy(clip=1e-3, noise=0.0, generator=torch.Generator().manual_seed(0))
    fl.federated_round(model, opt, clients, 3, keys, robust.combiner(privacy=privacy))
    moved = robust.update_norm({k: clients[0].model_state[k] for k in keys}, start)
    assert 0 < moved <= 1e-3 + 1e-7
