"""SegViz over Flower (flower/): the pure pieces of the app, Flower's local simulation through
flower/run.py (`flwr run flower`, `cd flower && flwr run .`), a real federation on 127.0.0.1 (a
SuperLink and two SuperNodes as subprocesses) against the in-process loop (`python train.py`),
and one with TLS and SuperNode authentication that refuses an unregistered SuperNode."""

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip(
    "flwr", reason="Flower is not installed: pip install -r requirements-flower.txt"
)

from cryptography import x509  # installed with Flower
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.common.config import get_project_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "flower")
sys.path.insert(0, APP)  # the app's package, as Flower loads it from the FAB

import segviz_flower  # noqa: E402
from segviz_flower import server_app, task  # noqa: E402

from eval import main as eval_main  # noqa: E402
from settings import add_arguments, config_from_args, saved  # noqa: E402
from unet3d import UNet3D, UNetConfig  # noqa: E402

GIVE_UP_S = 240  # the whole federation: start, two rounds, head collection, test


def app_config() -> dict:
    return get_project_config(APP)["tool"]["flwr"]["app"]["config"]


def server_side(cfg: dict):
    opts = server_app.options(cfg)
    return server_app.coordinator(server_app.server_config(cfg, opts), opts, task.variant_of(cfg))


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------


def test_state_dict_roundtrips_exactly_through_an_array_record():
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(classes=2, channels=(4, 8), task_stages=1))
    model = model.to(memory_format=torch.channels_last_3d)  # the layout train.py trains in
    state = {
        **model.state_dict(),
        "step": torch.tensor(3.0),
        "count": torch.tensor([7], dtype=torch.long),
        "double": torch.randn(2, 3, dtype=torch.float64),
    }
    record = task.to_record(state)
    back = task.from_record(record)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    assert task.array_keys(task.RecordDict({"a": record})) == sorted(state)
    # Adam's nested state, kept on the node between rounds, comes back exactly too
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(1, 1, 8, 8, 8)).sum().backward()
    opt.step()
    again = task.from_bytes(task.to_bytes(opt.state_dict()))
    assert again["param_groups"] == opt.state_dict()["param_groups"]
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(again["state"][i][k], v) for k, v in s.items())


@pytest.mark.parametrize("mode, extra", [("segviz", []), ("segviz", ["fedbn"]), ("fedavg", [])])
def test_keys_sent_each_round_and_once_at_the_end(mode, extra, tmp_path):
    cfg = {
        **app_config(),
        "nodes": 2,
        "mode": mode,
        "out": str(tmp_path / "run"),
        **dict.fromkeys(extra, True),
    }
    co = server_side(cfg)
    state = co.run.clients[0].model_state
    every_round, at_the_end = co.run.keys, task.local_keys(state, co.run.keys)
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
    mine = server_app.server_config(cfg, server_app.options(cfg))
    p = argparse.ArgumentParser()
    add_arguments(p)
    plain = config_from_args(
        p.parse_args(["--out", str(tmp_path / "run"), "--cache", mine.cache]), p
    )
    assert saved(mine) == saved(plain)


def test_unset_values_mean_the_presets():
    assert "--channels" not in task.train_argv({"channels": ""})
    argv = task.train_argv(
        {"channels": "8,16,32,64,128", "patch": "32 32 16", "data": "test=/a,liver=/b"}
    )
    assert argv[argv.index("--channels") + 1] == "8,16,32,64,128"
    assert argv[argv.index("--patch") + 1:argv.index("--patch") + 4] == ["32", "32", "16"]
    assert argv.count("--data") == 2 and "liver=/b" in argv
    assert "--no-largest" in task.train_argv({"largest": False}) and "--largest" in task.train_argv(
        {"largest": True}
    )
    assert not {"--largest", "--no-largest", "--rounds", "--lr"} & set(
        task.train_argv({"largest": "", "rounds": ""})
    )


def test_the_fingerprint_ignores_paths_but_not_settings(tmp_path):
    cfg = {**app_config(), "out": str(tmp_path / "run")}
    v = task.variant_of(cfg)
    key = task.settings_key(task.config_from(cfg, out="a", cache="b", device="cpu"), v)
    assert task.settings_key(task.config_from(cfg, out="c", cache="d", device="cpu"), v) == key
    assert (
        task.settings_key(
            task.config_from({**cfg, "lr": 0.01}, out="a", cache="b", device="cpu"), v
        )
        != key
    )
    assert (
        task.settings_key(
            task.config_from(cfg, out="a", cache="b", device="cpu"), {**v, "dropout": 0.5}
        )
        != key
    )
    # a node of another version, whose preset has another patch, must not match either
    assert (
        task.settings_key(
            task.config_from({**cfg, "patch": "32 32 32"}, out="a", cache="b", device="cpu"), v
        )
        != key
    )


def test_modes_that_pool_data_and_bad_variants_are_refused(tmp_path):
    cfg = {**app_config(), "mode": "central", "out": str(tmp_path / "run")}
    with pytest.raises(ValueError, match="cannot run over Flower"):
        server_app.server_config(cfg, server_app.options(cfg))
    with pytest.raises(ValueError, match="refuses"):
        task.config_from({**cfg, "mode": "segviz", "rounds": -1}, out="a", cache="b", device="cpu")
    with pytest.raises(ValueError, match="aggregate"):
        task.variant_of({"aggregate": "mode"})


def test_a_simulated_node_takes_its_site_from_its_partition_id():
    def context(node):
        return SimpleNamespace(node_config=node)
    assert [task.site_of(context({"partition-id": i, "num-partitions": 4})) for i in range(4)] == [
        "liver", "spleen", "pancreas", "kidneys"]
    assert task.site_of(context({"site": "spleen", "partition-id": 0})) == "spleen"
    with pytest.raises(ValueError, match="no site"):
        task.site_of(context({}))


def test_a_simulation_trains_one_site_per_simulated_supernode(capsys):
    assert task.simulation_sites({"nodes": 4}, 2) == 2
    assert task.simulation_sites({"nodes": 2}, 3) == 2
    assert server_app.sized({"nodes": 4, "rounds": 1}, 0) == {"nodes": 4, "rounds": 1}  # real
    assert server_app.sized({"nodes": 4, "rounds": 1}, 2) == {"nodes": 2, "rounds": 1}
    assert "2 site(s) of the run's 4 take part (liver, spleen)" in capsys.readouterr().out
    assert task.simulation_size({"partition-id": 1, "num-partitions": 3}) == 3
    assert task.simulation_size({"site": "liver", "partition-id": 1, "num-partitions": 3}) == 0


def test_a_simulated_node_uses_the_run_configs_paths_a_real_supernode_its_own(tmp_path):
    run_config = {**app_config(), "data-root": str(tmp_path / "run-data"), "nodes": 4,
                  "out": str(tmp_path / "run"),
                  "data": f"spleen={tmp_path / 'spleen'}", "cache": str(tmp_path / "run-cache")}

    def settings(node):
        return task.node_settings(SimpleNamespace(node_config=node, run_config=run_config))

    site, cfg, _, folder = settings({"partition-id": 1, "num-partitions": 2})
    assert site == "spleen" and cfg.nodes == 2 and folder == str(tmp_path / "run" / "sites")
    assert (cfg.data_root, cfg.cache) == (str(tmp_path / "run-data"), str(tmp_path / "run-cache"))
    assert cfg.data == {"spleen": str(tmp_path / "spleen")}
    site, cfg, _, folder = settings({"site": "spleen", "data-root": str(tmp_path / "mine"),
                                     "out": str(tmp_path / "node")})
    assert folder == str(tmp_path / "node" / "run")  # the last part of the run's out names it
    assert site == "spleen" and cfg.nodes == 4 and cfg.data_root == str(tmp_path / "mine")
    assert not cfg.data and cfg.cache != str(tmp_path / "run-cache")  # the run's are the server's
    with pytest.raises(ValueError, match="real data everywhere or the phantom everywhere"):
        settings({"site": "spleen"})


def test_the_app_finds_the_checkout_from_the_working_directory_or_above_it(tmp_path):
    installed = tmp_path / "apps" / "segviz.segviz-flower" / "segviz_flower"  # as from a FAB
    shutil.copytree(os.path.join(APP, "segviz_flower"), installed)
    assert segviz_flower.find_checkout("", str(installed / "__init__.py"), APP) == ROOT
    assert segviz_flower.find_checkout("", str(installed / "__init__.py"), ROOT) == ROOT
    assert segviz_flower.find_checkout("", str(installed / "__init__.py"), str(tmp_path)) is None
    assert segviz_flower.find_checkout(ROOT, str(installed / "__init__.py"), str(tmp_path)) == ROOT
    # `cd flower && flwr run .`: the app, loaded from outside the checkout with no SEGVIZ_ROOT,
    # puts the checkout above the working directory on the path
    env = {k: v for k, v in os.environ.items() if k != "SEGVIZ_ROOT"}
    env["PYTHONPATH"] = str(installed.parent)
    probe = "import sys, segviz_flower; print(sys.path[0])"
    found = subprocess.run([sys.executable, "-c", probe], cwd=os.path.join(APP, "segviz_flower"),
                           env=env, capture_output=True, text=True)
    assert found.returncode == 0 and found.stdout.strip() == ROOT, found.stderr[-2000:]
    lost = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert lost.returncode != 0 and "set SEGVIZ_ROOT" in lost.stderr


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
    kill_survivors(pids)
    return pids


def kill_survivors(pids: set[int], grace: float = 10) -> None:
    """Give these processes `grace` seconds to end, then kill the ones still alive."""
    deadline = time.time() + grace
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def log_tail(path, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f"--- {path}\n" + f.read()[-n:]
    except FileNotFoundError:
        return ""


def loopback_env(home, link: int, security: str) -> dict:
    """The environment of a federation on 127.0.0.1: a Flower configuration of its own (~/.flwr
    stays untouched) whose default connection `segviz-test` reaches the SuperLink's port `link`
    (`security`: its TOML line, `insecure = true` or the CA's `root-certificates`), one torch
    thread per process (the in-process reference uses one too) and no usage telemetry."""
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "segviz-test"\n\n[superlink.segviz-test]\n'
        f'address = "127.0.0.1:{link}"\n{security}\n'
    )
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "SEGVIZ_ROOT": ROOT,
    }


def starter(procs: list[subprocess.Popen], env: dict, cwd):
    """start(argv, log): a process in a session (and group) of its own, its output in `log`,
    kept in `procs` for stop()."""
    def start(argv: list[str], log) -> subprocess.Popen:
        with open(log, "w") as f:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                          cwd=cwd, start_new_session=True))
        return procs[-1]
    return start


@pytest.mark.slow
def test_two_supernodes_on_loopback_train_as_the_in_process_loop(tmp_path):
    t0 = time.time()
    deadline = t0 + GIVE_UP_S
    cache, out, node_out, home = (
        tmp_path / "cache",
        tmp_path / "flower",
        tmp_path / "nodes",
        tmp_path / "flwr-home",
    )
    link, liver_port, spleen_port = free_ports(3)
    env = loopback_env(home, link, 'insecure = true')
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "liver", "spleen", "run")}
    procs: list[subprocess.Popen] = []
    start = starter(procs, env, tmp_path)

    try:
        start(
            [
                executable("flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link),
                "--disable-runtime-dependency-installation",
            ],
            logs["superlink"],
        )
        for site, port in (("liver", liver_port), ("spleen", spleen_port)):
            start([executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                   "--port", str(port), "--node-config",
                   f"site='{site}' cache='{cache}' out='{node_out}' threads=1"], logs[site])
        # the in-process loop (python train.py) while the SuperNodes connect; it also fills the
        # phantom cache that the nodes and the server read when the run starts. One torch thread,
        # as on the nodes (OMP_NUM_THREADS=1), so that the weights match bitwise
        settings = [
            "--nodes",
            "2",
            "--mode",
            "segviz",
            "--rounds",
            "2",
            "--local-steps",
            "1",
            "--max-cases",
            "1",
            "--seeds",
            "3",
            "--out",
            str(tmp_path / "ref"),
            "--cache",
            str(cache),
            "--device",
            "cpu",
        ]
        ref = subprocess.run(
            [sys.executable, "train.py", *settings],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIVE_UP_S,
        )
        assert ref.returncode == 0, ref.stderr[-3000:]
        reference = json.loads((tmp_path / "ref" / "seed-3" / "metrics.json").read_text())
        wait_for_port(link, deadline)
        run_config = (
            f"nodes=2 mode='segviz' rounds=2 local-steps=1 max-cases=1 seeds=3 out='{out}' "
            f"cache='{cache}' timeout=120 wait-for-nodes=60"
        )
        run = start(
            [
                sys.executable,
                os.path.join(APP, "run.py"),
                APP,
                "segviz-test",
                "--run-config",
                run_config,
            ],
            logs["run"],
        )
        try:
            run.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the Flower run did not finish within {GIVE_UP_S} s; gave up\n"
                        + "\n".join(log_tail(p) for p in logs.values()))
        stream = log_tail(logs["run"], 100_000)
        # run.py exits 0 only when the run finished:completed (`flwr run` alone exits 0 even then)
        assert (
            run.returncode == 0 and "finished:completed" in stream and (out / "model.pt").exists()
        ), "\n".join(log_tail(p) for p in logs.values())
    finally:
        stopped = stop(procs)
    # (a) it ended cleanly and nothing it started is left running
    assert not [pid for pid in stopped if alive(pid)]
    assert "round   2/2" in stream and "checkpoint" in stream

    # (b) the same weights as the in-process loop (bitwise on one CPU thread; tolerance for others)
    mine = torch.load(out / "model.pt", weights_only=True)["states"]
    theirs = torch.load(tmp_path / "ref" / "seed-3" / "model.pt", weights_only=True)["states"]
    assert list(mine) == list(theirs) == ["liver", "spleen"]
    for site in theirs:
        assert list(mine[site]) == list(theirs[site])
        for k, v in theirs[site].items():
            torch.testing.assert_close(mine[site][k], v, rtol=1e-5, atol=1e-6, msg=f"{site} {k}")
    metrics = json.loads((out / "metrics.json").read_text())
    for organ in ("liver", "spleen"):
        assert metrics["dice"][organ]["cases"] == pytest.approx(
            reference["dice"][organ]["cases"], abs=1e-6
        )
    assert metrics["losses"].keys() == reference["losses"].keys()
    for site, losses in reference["losses"].items():  # pytest.approx compares flat sequences only
        assert metrics["losses"][site] == pytest.approx(losses, rel=1e-5)

    # (c) during the rounds the server received representation keys only; task blocks came once, at
    # the end
    exchange = json.loads((out / server_app.EXCHANGE_LOG).read_text())
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
    assert again["dice"]["liver"]["cases"] == pytest.approx(
        metrics["dice"]["liver"]["cases"], abs=1e-6
    )


# ---------------------------------------------------------------------------------------
# Only the federation's own sites: TLS and SuperNode authentication on 127.0.0.1
# ---------------------------------------------------------------------------------------


def certificate(subject: str, key, issuer: str, signer, *, ca: bool):
    """An X.509 certificate for `key`, signed by `signer`: the CA's own, or a server's for
    127.0.0.1 (the SuperLink's address, and where its own helper processes connect)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = dict.fromkeys(("content_commitment", "data_encipherment", "key_agreement",
                           "encipher_only", "decipher_only"), False)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                       critical=False)
        .add_extension(x509.KeyUsage(digital_signature=not ca, key_encipherment=False,
                                     key_cert_sign=ca, crl_sign=ca, **usage), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def write_tls(folder) -> dict[str, str]:
    """A CA and the SuperLink's certificate and key, as PEM files in `folder`."""
    folder.mkdir()
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1()
    )
    ca = certificate("SegViz test CA", ca_key, "SegViz test CA", ca_key, ca=True)
    server = certificate("127.0.0.1", server_key, "SegViz test CA", ca_key, ca=False)
    paths = {name: str(folder / name) for name in ("ca.crt", "server.pem", "server.key")}
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


def write_supernode_key(folder, name: str) -> tuple[str, str]:
    """An EC (P-384) key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` writes it:
    the private key for the SuperNode, the public one (.pub) for `flwr supernode register`."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return str(private), str(public)


def flwr_cli(args: list[str], env: dict) -> dict:
    """A `flwr` command's JSON answer (--format json)."""
    done = subprocess.run([executable("flwr"), *args, "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=60)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"flwr {' '.join(args)}: {done.stdout}{done.stderr}")


@pytest.mark.slow
def test_only_registered_supernodes_join_a_superlink_with_tls_and_supernode_auth(tmp_path):
    deadline = time.time() + GIVE_UP_S
    cache, out, node_out, keys = (tmp_path / d for d in ("cache", "flower", "nodes", "keys"))
    keys.mkdir()
    sites = task.SITES
    link, *ports = free_ports(1 + len(sites) + 1)
    tls = write_tls(tmp_path / "certs")
    env = loopback_env(tmp_path / "flwr-home", link, f'root-certificates = "{tls["ca.crt"]}"')
    logs = {n: tmp_path / f"{n}.log" for n in ("superlink", *sites, "stranger", "run")}
    procs: list[subprocess.Popen] = []
    start = starter(procs, env, tmp_path)

    # each SuperNode's key pair; the stranger's public key is never registered
    pairs = {name: write_supernode_key(keys, name) for name in (*sites, "stranger")}

    def supernode(name: str, site: str, port: int) -> subprocess.Popen:
        return start([executable("flower-supernode"), "--root-certificates", tls["ca.crt"],
                      "--superlink", f"127.0.0.1:{link}", "--port", str(port),
                      "--auth-supernode-private-key", pairs[name][0], "--node-config",
                      f"site='{site}' cache='{cache}' out='{node_out}' threads=1"], logs[name])

    try:
        start([executable("flower-superlink"), "--ssl-ca-certfile", tls["ca.crt"],
               "--ssl-certfile", tls["server.pem"], "--ssl-keyfile", tls["server.key"],
               "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link)],
              logs["superlink"])
        wait_for_port(link, deadline)
        registered = {}
        for site in sites:  # each site's public key, registered before its SuperNode starts
            answer = flwr_cli(["supernode", "register", pairs[site][1], "segviz-test",
                               "--name", site], env)
            assert answer.get("success"), answer
            registered[site] = int(answer["node-id"])
        for site, port in zip(sites, ports):
            supernode(site, site, port)
        # a fifth SuperNode with a key nobody registered, claiming a site of the federation
        stranger = supernode("stranger", "liver", ports[-1])
        run_config = (f"nodes=4 rounds=1 local-steps=1 max-cases=1 spacing='6 6 6' seeds=3 "
                      f"out='{out}' cache='{cache}' timeout=120 wait-for-nodes=60")
        run = start([sys.executable, os.path.join(APP, "run.py"), APP, "segviz-test",
                     "--run-config", run_config], logs["run"])
        try:
            run.wait(timeout=max(1.0, deadline - time.time()))
            stranger.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the Flower run did not finish within {GIVE_UP_S} s; gave up\n"
                        + "\n".join(log_tail(p) for p in logs.values()))
        listed = flwr_cli(["supernode", "list", "segviz-test"], env)
    finally:
        stopped = stop(procs)
    assert not [pid for pid in stopped if alive(pid)]
    every_log = "\n".join(log_tail(p) for p in logs.values())
    assert run.returncode == 0 and "finished:completed" in log_tail(logs["run"]), every_log
    # the stranger was refused when it tried to join and gave up
    assert stranger.returncode != 0
    assert "Failed to activate SuperNode" in log_tail(logs["stranger"]), every_log
    # the run's nodes are the four registered ones, each its own site; nothing else sent a thing
    journal = json.loads((out / server_app.EXCHANGE_LOG).read_text())
    assert journal["nodes"] == registered
    assert sorted(journal["rounds"][0]["received"]) == sorted(sites)
    assert sorted(journal["final"]["received"]) == sorted(sites)
    assert {int(n["node-id"]): n["status"] for n in listed["nodes"]} == dict.fromkeys(
        registered.values(), "online"
    ), listed
    assert (out / "model.pt").exists()


# ---------------------------------------------------------------------------------------
# Flower's local simulation: flwr run flower, through flower/run.py
# ---------------------------------------------------------------------------------------


def processes_mentioning(text: str) -> set[int]:
    """Processes whose command line holds `text` (the local SuperLink that `flwr run` starts
    detached, found by the FLWR_HOME folder of this test alone)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.add(int(entry))
            except OSError:
                continue
    return found


def local_simulation_env(home) -> dict:
    """Flower's default local simulation, in a Flower home and on ports of the test's own."""
    http, control = free_ports(2)
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }


@pytest.mark.slow
def test_a_bare_flwr_run_flower_trains_a_site_per_supernode_and_a_failure_exits_non_zero(tmp_path):
    home, out, cache = tmp_path / "flwr-home", tmp_path / "sim", tmp_path / "cache"
    env = local_simulation_env(home)
    # no --federation-config and the app's nodes=4: Flower's default of 2 simulated SuperNodes
    wrapper = [sys.executable, os.path.join(APP, "run.py"), "flower"]
    settings = (f"rounds=2 local-steps=1 max-cases=1 seeds=3 out='{out}' cache='{cache}' "
                "wait-for-nodes=60")
    try:
        good = subprocess.run(
            [*wrapper, "--run-config", settings],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIVE_UP_S,
        )
        bad = subprocess.run(
            [*wrapper, "--run-config", f"{settings} mode='central'"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=GIVE_UP_S,
        )
    finally:
        stop_pids(processes_mentioning(str(home)))
    log = good.stdout + good.stderr
    assert good.returncode == 0, log[-5000:]
    assert "round   2/2" in log and "finished:completed" in log
    assert "simulation has 2 SuperNode(s): 2 site(s) of the run's 4 take part" in log
    metrics = json.loads((out / "metrics.json").read_text())
    # partition-id 0 and 1 of the simulation are the liver and spleen sites
    assert list(metrics["losses"]) == ["liver", "spleen"] and all(
        len(v) == 2 for v in metrics["losses"].values()
    )
    assert (out / "model.pt").exists()
    # a ServerApp that fails (here: a mode that pools data) makes the wrapper exit non-zero
    assert bad.returncode != 0, (bad.stdout + bad.stderr)[-3000:]
    assert "cannot run over Flower" in bad.stdout + bad.stderr and "finished:failed" in bad.stdout


def a_data_root(folder) -> str:
    """The public datasets' layouts built from the real CT, else the synthetic archives."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "realdata"))
    import layouts

    if not layouts.MISSING:
        return str(layouts.data_root(folder))
    synth = [sys.executable, "-m", "realdata", "synth", str(folder), "--cases", "2",
             "--test-cases", "1", "--coarsen", "3"]
    subprocess.run(synth, cwd=ROOT, check=True, capture_output=True, timeout=GIVE_UP_S)
    return str(folder)


@pytest.mark.slow
def test_flwr_run_dot_in_flower_simulates_the_sites_on_the_run_configs_real_data(tmp_path):
    home, out, cache = tmp_path / "flwr-home", tmp_path / "sim", tmp_path / "cache"
    env = local_simulation_env(home)
    root = a_data_root(tmp_path / "data")
    settings = (f"rounds=1 local-steps=1 max-cases=1 val-split='0' spacing='6 6 6' "
                f"data-root='{root}' out='{out}' cache='{cache}' wait-for-nodes=60")
    try:
        run = subprocess.run(
            [sys.executable, "run.py", ".", "--run-config", settings],
            cwd=APP,  # cd flower && flwr run .
            env=env,
            capture_output=True,
            text=True,
            timeout=GIVE_UP_S,
        )
    finally:
        stop_pids(processes_mentioning(str(home)))
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "finished:completed" in log, log[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source"]["source"] == "real" and (out / "model.pt").exists()
    assert list(metrics["losses"]) == ["liver", "spleen"]
    # each simulated node read its own dataset under the run config's data-root and kept it in the
    # run's cache: one case for the server's test set, one for each site (max-cases=1)
    assert len(list(cache.glob("real-*.pt"))) == 3
    # and kept its state with the run's results
    assert [len(list((out / "sites").glob(f"{s}-*-r00001.pt"))) for s in ("liver", "spleen")] == [
        1, 1]


def stop_pids(pids: set[int]) -> None:
    """Stop these processes and every process below them."""
    every = pids | descendants(list(pids))
    for pid in every:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    kill_survivors(every)
