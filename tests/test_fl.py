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

        clients.append(
            fl.new_client(
                f"c{i}", model, optimizer, batch, nn.functional.cross_entropy, weight=i + 1
            )
        )
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


def test_a_client_trains_with_its_own_optimiser_state_only():
    # b trained after a must be exactly b trained alone: the live optimiser's moments from a's
    # steps must not carry over into b's
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    a, b = make_clients(model, opt, 2)
    fl.local_train(model, opt, a, steps=3)
    fl.local_train(model, opt, b, steps=3)
    model_alone = tiny_model()
    opt_alone = torch.optim.Adam(model_alone.parameters(), 1e-2)
    _, b_alone = make_clients(model_alone, opt_alone, 2)
    fl.local_train(model_alone, opt_alone, b_alone, steps=3)
    assert all(torch.equal(b.model_state[k], b_alone.model_state[k]) for k in b.model_state)
    moments = [
        (k, m) for k, st in b.optim_state["state"].items() for m in ("exp_avg", "exp_avg_sq")
    ]
    assert all(
        torch.equal(b.optim_state["state"][k][m], b_alone.optim_state["state"][k][m])
        for k, m in moments
    )


def test_average_is_the_elementwise_mean_and_respects_weights():
    s = [
        {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(1)},
        {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor(6)},
    ]
    out = fl.average(s)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 3.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 4  # 3.5 is rounded, not truncated
    weighted = fl.average(s, [3.0, 1.0])
    torch.testing.assert_close(weighted["w"], torch.tensor([0.5, 2.5]))


def test_round_writes_the_average_back_into_every_client():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt)
    shared = ["0.weight", "0.bias"]
    seen = []

    def recording_average(states, reference, weights):
        seen.append([dict(s) for s in states])
        return fl.mean(states, reference, weights)

    fl.federated_round(model, opt, clients, 2, shared, recording_average)
    trained = seen[0]
    expected = fl.average(trained)
    assert not torch.equal(trained[0]["0.weight"], trained[1]["0.weight"]), (
        "clients must have diverged"
    )
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

    def capture(states, reference, weights):
        for c in clients:  # state right after local training, before write-back
            captured[c.name] = {k: v.clone() for k, v in c.model_state.items()}
        return fl.mean(states, reference, weights)

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

    def capture(states, reference, weights):
        got["w"] = weights
        return fl.mean(states, reference, weights)

    fl.federated_round(model, opt, clients, 1, ["0.bias"], capture, weighted=True)
    assert got["w"] == [1, 2, 3]
    fl.federated_round(model, opt, clients, 1, ["0.bias"], capture, weighted=False)
    assert got["w"] is None


def test_no_shared_keys_means_no_aggregation():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt)

    def never(states, reference, weights):
        raise AssertionError("aggregation must not run")

    fl.federated_round(model, opt, clients, 1, [], never)


# ---------------------------------------------------------------------------------------
# Absent clients
# ---------------------------------------------------------------------------------------


def test_absent_clients_do_not_train_are_not_averaged_and_receive_the_result():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt)
    absent = clients[1]
    before = {k: v.clone() for k, v in absent.model_state.items()}
    seen = []

    def record(states, reference, weights):
        seen.append(len(states))
        return fl.mean(states, reference, weights)

    report = fl.federated_round(
        model, opt, clients, 2, ["0.weight"], record, present=[clients[0], clients[2]]
    )
    assert report.absent == ["c1"] and set(report.losses) == {"c0", "c2"}
    assert seen == [2]
    assert torch.equal(absent.model_state["2.weight"], before["2.weight"]), (
        "an absent client does not train"
    )
    assert torch.equal(absent.model_state["0.weight"], clients[0].model_state["0.weight"])
    assert not torch.equal(absent.model_state["0.weight"], before["0.weight"])


def test_a_round_with_nobody_present_keeps_the_weights():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    clients = make_clients(model, opt)
    before = [{k: v.clone() for k, v in c.model_state.items()} for c in clients]
    report = fl.federated_round(model, opt, clients, 2, ["0.weight"], present=[])
    assert report.absent == ["c0", "c1", "c2"]
    for c, b in zip(clients, before):
        assert all(torch.equal(c.model_state[k], b[k]) for k in b)


def test_client_states_go_to_host_memory_when_the_device_cannot_hold_them(monkeypatch):
    assert fl.choose_store(torch.device("cpu"), 100, 10**9) == torch.device("cpu")
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 10**9, 80 * 10**9))
    assert fl.choose_store(gpu, 4, 10**9) == gpu  # 4 GB of states fit in half of 8 GB free
    assert fl.choose_store(gpu, 16, 10**9) == torch.device("cpu")
    model = tiny_model()
    assert fl.state_bytes(model) == 3 * sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def test_a_client_stored_elsewhere_trains_and_stays_there():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    client = make_clients(model, opt, 1)[0]
    client = fl.new_client("c", model, opt, client.next_batch, client.loss_fn, store="cpu")
    fl.local_train(model, opt, client, 2)
    assert all(v.device.type == "cpu" for v in client.model_state.values())
    assert all(
        t.device.type == "cpu"
        for s in client.optim_state["state"].values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )


def autocast_seen(model: nn.Module) -> list:
    """What each forward pass of the model ran under: (autocast on, its CPU type)."""
    seen = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append((torch.is_autocast_enabled("cpu"),
                                     torch.get_autocast_dtype("cpu")))
    )
    return seen


def test_amp_reaches_the_forward_pass_and_the_default_stays_float32():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    seen = autocast_seen(model)
    plain, = make_clients(model, opt, 1)
    fl.local_train(model, opt, plain, steps=2)
    assert seen == [(False, seen[0][1])] * 2 and plain.amp is None and plain.scaler is None
    floats = [v for v in plain.model_state.values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats)
    seen.clear()
    mixed = fl.new_client("m", model, opt, make_clients(model, opt, 1)[0].next_batch,
                          nn.functional.cross_entropy, amp=torch.bfloat16)
    before = mixed.model_state["0.weight"].clone()
    fl.local_train(model, opt, mixed, steps=2)
    assert seen == [(True, torch.bfloat16)] * 2 and mixed.scaler is None
    # the weights and the optimiser stay float32: autocast changes the arithmetic, not the model
    assert mixed.model_state["0.weight"].dtype == torch.float32
    assert not torch.equal(mixed.model_state["0.weight"], before)


def test_float16_trains_with_a_gradient_scaler_of_the_sites_own():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    batch = make_clients(model, opt, 1)[0].next_batch
    a, b = (fl.new_client(n, model, opt, batch, nn.functional.cross_entropy, amp=torch.float16)
            for n in "ab")
    assert a.scaler is not None and a.scaler is not b.scaler
    seen = autocast_seen(model)
    before = a.model_state["0.weight"].clone()
    fl.local_train(model, opt, a, steps=3)
    assert seen == [(True, torch.float16)] * 3
    assert not torch.equal(a.model_state["0.weight"], before)
    # the scaler counted a's steps, b's did not move
    assert a.scaler.state_dict()["_growth_tracker"] == 3
    assert b.scaler.state_dict()["_growth_tracker"] == 0
