"""SegViz over Flower: the pure pieces of flower_app.py, and a real federation on 127.0.0.1
(a SuperLink and two SuperNodes as subprocesses) against the in-process loop."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed: pip install -r requirements-flower.txt")

from flwr.common.config import get_project_config

import flower_app
import train
from eval import main as eval_main
from unet3d import UNet3D, UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIVE_UP_S = 240  # the whole federation: start, two rounds, head collection, test


def app_config() -> dict:
    return get_project_config(ROOT)["tool"]["flwr"]["app"]["config"]


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------


def test_state_dict_roundtrips_exactly_through_an_array_record():
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(classes=2, channels=(4, 8), task_stages=1))
    model = model.to(memory_format=torch.channels_last_3d)  # the layout train.py trains in
    state = {**model.state_dict(), "step": torch.tensor(3.0), "count": torch.tensor([7], dtype=torch.long),
             "double": torch.randn(2, 3, dtype=torch.float64)}
    record = flower_app.to_record(state)
    back = flower_app.from_record(record)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    assert flower_app.array_keys(flower_app.RecordDict({"a": record})) == sorted(state)
    # Adam's nested state, kept on the node between rounds, comes back exactly too
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(1, 1, 8, 8, 8)).sum().backward()
    opt.step()
    again = flower_app.from_bytes(flower_app.to_bytes(opt.state_dict()))
    assert again["param_groups"] == opt.state_dict()["param_groups"]
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(again["state"][i][k], v) for k, v in s.items())


@pytest.mark.parametrize("mode, extra", [("segviz", []), ("segviz", ["fedbn"]), ("fedavg", [])])
def test_keys_sent_each_round_and_once_at_the_end(mode, extra, tmp_path):
    cfg = {**app_config(), "nodes": 2, "mode": mode, "out": str(tmp_path / "run"), **dict.fromkeys(extra, True)}
    opts = flower_app.options(cfg)
    co = flower_app.coordinator(flower_app.server_args(cfg, opts), opts)
    state = co.run.clients[0].model_state
    every_round, at_the_end = co.run.keys, flower_app.local_keys(state, co.run.keys)
    assert sorted(every_round + at_the_end) == sorted(state)
    if mode == "fedavg":
        assert every_round == list(state) and at_the_end == []
    else:
        assert every_round and all(k.startswith("rep.") for k in every_round)
        assert any(k.startswith("task.") for k in at_the_end)
        assert all(k.startswith("task.") for k in at_the_end) == (not extra)
        if extra:  # FedBN: normalisation layers stay home too
            assert not any("norm" in k for k in every_round)


def test_the_app_defaults_are_train_py_defaults(tmp_path):
    cfg = {**app_config(), "out": str(tmp_path / "run")}
    args = flower_app.server_args(cfg, flower_app.options(cfg))
    plain = train.parse_args(["--out", str(tmp_path / "run"), "--device", "auto"])
    assert train.settings_of(args) == train.settings_of(plain)


def test_channels_pass_through_and_empty_means_the_presets():
    assert "--channels" not in flower_app.train_argv({"channels": ""})
    assert flower_app.train_argv({"channels": "8,16,32,64,128"}) == ["--channels", "8,16,32,64,128"]


def test_a_state_from_before_the_newer_settings_still_matches(tmp_path, monkeypatch):
    cfg = {**app_config(), "out": str(tmp_path / "run")}
    args = flower_app.server_args(cfg, flower_app.options(cfg))
    now = flower_app.settings_key(args)
    older = tuple(k for k in train.RUN_SETTINGS if k != "channels")
    monkeypatch.setattr(train, "RUN_SETTINGS", older)
    assert flower_app.settings_key(args) == now  # what a state file written before them holds
    monkeypatch.undo()
    args.channels = [8, 16, 32, 64]
    assert flower_app.settings_key(args) != now


def test_modes_that_pool_data_are_refused(tmp_path):
    cfg = {**app_config(), "mode": "central", "out": str(tmp_path / "run")}
    with pytest.raises(ValueError, match="cannot run over Flower"):
        flower_app.server_args(cfg, flower_app.options(cfg))


# ---------------------------------------------------------------------------------------
# A federation on 127.0.0.1
# ---------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def executable(name: str) -> str:
    """Flower's command from this interpreter's environment (the one pytest runs in)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else shutil.which(name) or name


def wait_for_port(port: int, deadline: float) -> None:
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the SuperLink did not listen on 127.0.0.1:{port} in time")


def alive(pid: int) -> bool:
    """Running (not a zombie waiting for a parent that is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def descendants(roots: list[int]) -> set[int]:
    """Every process below `roots` (Flower starts SuperExec, ServerApp and ClientApp processes,
    some in sessions of their own, so killing the roots' process groups may not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def stop(procs: list[subprocess.Popen]) -> set[int]:
    """Stop what the test started and everything below it; returns every pid it had to stop."""
    pids = {p.pid for p in procs} | descendants([p.pid for p in procs])
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)  # each was started in a session (and group) of its own
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
    deadline = time.time() + 10
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def log_tail(path, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f"--- {path}\n" + f.read()[-n:]
    except FileNotFoundError:
        return ""


def test_two_supernodes_on_loopback_train_as_the_in_process_loop(tmp_path):
    t0 = time.time()
    deadline = t0 + GIVE_UP_S
    cache, out, node_out, home = tmp_path / "cache", tmp_path / "flower", tmp_path / "nodes", tmp_path / "flwr-home"
    link, liver_port, spleen_port = free_ports(3)
    home.mkdir()
    (home / "config.toml").write_text(  # a Flower Configuration of its own: ~/.flwr stays untouched
        f'[superlink]\ndefault = "segviz-test"\n\n[superlink.segviz-test]\naddress = "127.0.0.1:{link}"\n'
        "insecure = true\n")
    # one torch thread per process (the in-process reference uses one too); no usage telemetry
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "liver", "spleen", "run")}
    procs: list[subprocess.Popen] = []

    def start(argv, log):
        with open(log, "w") as f:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                          start_new_session=True))
        return procs[-1]

    try:
        start([executable("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
               "--disable-runtime-dependency-installation"], logs["superlink"])
        for site, port in (("liver", liver_port), ("spleen", spleen_port)):
            start([executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                   "--port", str(port), "--node-config",
                   f"site='{site}' cache='{cache}' out='{node_out}' threads=1"], logs[site])
        # the in-process loop while the SuperNodes connect; it also fills the phantom cache that
        # the nodes and the server read when the run starts
        settings = ["--nodes", "2", "--mode", "segviz", "--rounds", "2", "--local-steps", "1", "--max-cases", "1",
                    "--seed", "3", "--out", str(tmp_path / "ref"), "--cache", str(cache)]
        # the nodes train on one thread (OMP_NUM_THREADS=1); so does the reference, whatever
        # thread count earlier tests left this process with, so that the weights match
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            reference = train.train(train.parse_args(settings))
        finally:
            torch.set_num_threads(threads)
        wait_for_port(link, deadline)
        run_config = (f"nodes=2 mode='segviz' rounds=2 local-steps=1 max-cases=1 seeds=3 out='{out}' "
                      f"cache='{cache}' timeout=120 wait-for-nodes=60")
        run = start([executable("flwr"), "run", ROOT, "segviz-test", "--stream", "--run-config", run_config],
                    logs["run"])
        try:
            run.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the Flower run did not finish within {GIVE_UP_S} s; gave up\n"
                        + "\n".join(log_tail(p) for p in logs.values()))
        stream = log_tail(logs["run"], 100_000)
        # `flwr run` exits 0 even when the ServerApp raised: the stream and the outputs tell
        assert run.returncode == 0 and "Exit Code" not in stream and (out / "model.pt").exists(), (
            "\n".join(log_tail(p) for p in logs.values()))
    finally:
        stopped = stop(procs)
    # (a) it ended cleanly and nothing it started is left running
    assert not [pid for pid in stopped if alive(pid)]
    assert "round   2/2" in stream and "checkpoint" in stream

    # (b) the same weights as the in-process loop (bitwise on one CPU thread; tolerance for others)
    mine = torch.load(out / "model.pt", weights_only=True)["states"]
    theirs = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["states"]
    assert list(mine) == list(theirs) == ["liver", "spleen"]
    for site in theirs:
        assert list(mine[site]) == list(theirs[site])
        for k, v in theirs[site].items():
            torch.testing.assert_close(mine[site][k], v, rtol=1e-5, atol=1e-6, msg=f"{site} {k}")
    metrics = json.loads((out / "metrics.json").read_text())
    for organ in ("liver", "spleen"):
        assert metrics["dice"][organ]["cases"] == pytest.approx(reference["dice"][organ]["cases"], abs=1e-6)
    assert metrics["losses"].keys() == reference["losses"].keys()
    for site, losses in reference["losses"].items():  # pytest.approx compares flat sequences only
        assert metrics["losses"][site] == pytest.approx(losses, rel=1e-5)

    # (c) during the rounds the server received representation keys only; task blocks came once, at the end
    exchange = json.loads((out / flower_app.EXCHANGE_LOG).read_text())
    shared = sorted(exchange["shared_keys"])
    assert shared and all(k.startswith("rep.") for k in shared)
    assert [r["round"] for r in exchange["rounds"]] == [1, 2]
    for r in exchange["rounds"]:
        assert sorted(r["received"]) == ["liver", "spleen"]
        for site, keys in r["received"].items():
            assert not [k for k in keys if k.startswith("task.")], (r["round"], site)
            assert keys == shared
    final = exchange["final"]["received"]
    assert all(keys and all(k.startswith("task.") for k in keys) for keys in final.values())
    # the task block and Adam's state stayed on the node, in its state file too
    assert len(list((node_out / "flower").glob("liver-*-r00002.pt"))) == 1

    # eval.py re-evaluates the Flower checkpoint from the checkpoint alone
    assert eval_main(["--checkpoint", str(out / "model.pt"), "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["dice"]["liver"]["cases"] == pytest.approx(metrics["dice"]["liver"]["cases"], abs=1e-6)
