"""The federated loop: local training stores state back, and aggregation writes back for real."""

import torch
from torch import nn

import fl


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
        clients.append(fl.new_client(f"c{i}", model, optimizer, batch, nn.functional.cross_entropy, weight=i + 1))
    return clients


def test_local_train_changes_the_client_and_only_it():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    a, b = make_clients(model, opt, 2)
    before_a = {k: v.clone() for k, v in a.model_state.items()}
    before_b = {k: v.clone() for k, v in b.model_state.items()}
    fl.local_train(model, opt, a, steps=3)
    assert not torch.equal(a.model_state["0.weight"], before_a["0.weight"])
    assert all(torch.equal(b.model_state[k], before_b[k]) for k in before_b)
    assert a.optim_state["state"], "optimiser moments must be kept with the client"
    # the stored state is a copy, not a view of the live model
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(a.model_state["0.weight"], model[0].weight)


def test_average_is_the_elementwise_mean_and_respects_weights():
    s = [{"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(1)}, {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor(4)}]
    out = fl.average(s)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 3.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 2  # 2.5 rounds to even
    weighted = fl.average(s, [3.0, 1.0])
    torch.testing.assert_close(weighted["w"], torch.tensor([0.5, 2.5]))


def test_round_writes_the_average_back_into_every_client():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt)
    shared = ["0.weight", "0.bias"]
    seen = []

    def recording_average(states, weights):
        seen.append([dict(s) for s in states])
        return fl.average(states, weights)

    fl.federated_round(model, opt, clients, 2, shared, recording_average)
    trained = seen[0]
    expected = fl.average(trained)
    assert not torch.equal(trained[0]["0.weight"], trained[1]["0.weight"]), "clients must have diverged"
    for c in clients:
        for k in shared:
            assert torch.equal(c.model_state[k], expected[k])
    # the aggregation saw only the shared keys
    assert all(set(s) == set(shared) for s in trained)


def test_round_leaves_unshared_keys_as_each_client_trained_them():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt)
    captured = {}

    def capture(states, weights):
        for c in clients:  # state right after local training, before write-back
            captured[c.name] = {k: v.clone() for k, v in c.model_state.items()}
        return fl.average(states, weights)

    fl.federated_round(model, opt, clients, 2, ["0.weight"], capture)
    for c in clients:
        for k in c.model_state:
            if k != "0.weight":
                assert torch.equal(c.model_state[k], captured[c.name][k])
    assert not torch.equal(clients[0].model_state["2.weight"], clients[1].model_state["2.weight"])


def test_sample_weighted_round_uses_client_weights():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt)
    got = {}

    def capture(states, weights):
        got["w"] = weights
        return fl.average(states, weights)

    fl.federated_round(model, opt, clients, 1, ["0.bias"], capture, weighted=True)
    assert got["w"] == [1, 2, 3]
    fl.federated_round(model, opt, clients, 1, ["0.bias"], capture, weighted=False)
    assert got["w"] is None


def test_no_shared_keys_means_no_aggregation():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt)

    def never(states, weights):
        raise AssertionError("aggregation must not run")

    fl.federated_round(model, opt, clients, 1, [], never)
