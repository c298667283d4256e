"""What every command shares: output folders checked by creating them (every script that writes
refuses, before any work, a folder it could not write, with one line and exit status 2, also as
root); files written whole or not at all; --device, tested on any machine by pretending which
devices exist."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

import common
import train
from common import amp_dtype, check_writable, resolve_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unwritable_paths(tmp_path) -> list[str]:
    """Paths no one can write: under /proc and /sys (root included), and under a regular file."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    paths = [str(blocker / "out")]
    if os.path.isdir("/proc/self"):
        paths += ["/proc/nope", "/proc/nope/deeper"]
    if os.path.isdir("/sys/kernel"):
        paths.append("/sys/kernel/nope")
    return paths


def refused(path, capsys, flag="--out", file=False) -> str:
    with pytest.raises(SystemExit) as e:
        check_writable(path, flag, file=file)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and f"{flag} {path}" in err
    return err


def test_unwritable_folders_are_refused_in_one_line(tmp_path, capsys):
    for path in unwritable_paths(tmp_path):
        assert "not writable" in refused(path, capsys), path
    assert not os.path.exists("/proc/nope")


def test_an_existing_read_only_mount_is_refused_even_for_root(capsys):
    # /proc exists and os.access(W_OK) says yes to root, but no file can be created in it
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system")
    assert "not writable" in refused("/proc", capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_a_read_only_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    refused(str(locked), capsys)
    refused(str(locked / "run"), capsys)


def test_a_regular_file_is_not_a_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a folder" in refused(str(f), capsys)
    assert "is a folder" in refused(str(tmp_path), capsys, file=True)


def test_a_writable_folder_passes_and_the_disk_is_left_as_it_was(tmp_path):
    check_writable(str(tmp_path / "a" / "b" / "c"), "--out")
    assert os.listdir(tmp_path) == []  # the folders it made to test are gone again
    (tmp_path / "kept").mkdir()
    check_writable(str(tmp_path / "kept"), "--out")
    check_writable(str(tmp_path / "kept" / "bench.json"), "--out", file=True)
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def run(*args):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def assert_one_line_exit_2(result, flag, path):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{flag} {path}" in lines[0] and "not writable" in lines[0], (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "script", ["train.py", "experiments suite", "realdata predict", "eval.py --out", "bench"]
)
def test_every_script_that_writes_refuses_before_any_work(script, tmp_path):
    # /proc/nope where there is /proc (the case os.access gets wrong for root), else under a file
    path = unwritable_paths(tmp_path)[1 if os.path.isdir("/proc/self") else 0]
    missing = str(tmp_path / "absent.pt")  # checked after the output: the output is refused first
    argv = {
        "train.py": ["train.py", "--out", path],
        "experiments suite": ["-m", "experiments", "suite", "--out", path],
        "realdata predict": [
            "-m",
            "realdata",
            "predict",
            "-i",
            str(tmp_path),
            "-o",
            path,
            "--checkpoint",
            missing,
        ],
        "eval.py --out": ["eval.py", "--checkpoint", missing, "--out", path],
        "bench": ["-m", "bench", "exchange", "--out", os.path.join(path, "bench.json")],
    }[script]
    flag = {"realdata predict": "-o"}.get(script, "--out")
    shown = argv[argv.index(flag) + 1]
    assert_one_line_exit_2(run(*argv), flag, shown)


# ---------------------------------------------------------------------------------------
# Files written whole
# ---------------------------------------------------------------------------------------




def test_write_atomic_replaces_whole_files_and_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "state.pt"
    common.write_atomic(str(path), lambda tmp: torch.save({"round": 1}, tmp))
    assert torch.load(path, weights_only=True) == {"round": 1}

    def dies_half_way(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        common.write_atomic(str(path), dies_half_way)
    assert torch.load(path, weights_only=True) == {"round": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind


# ---------------------------------------------------------------------------------------
# --device
# ---------------------------------------------------------------------------------------


def pretend(monkeypatch, cuda: bool, mps: bool, gpus: int = 1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (True, False, "cuda"),
                                                 (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(cuda, mps, expected, monkeypatch):
    pretend(monkeypatch, cuda, mps)
    assert resolve_device("auto", argparse.ArgumentParser()) == torch.device(expected)


@pytest.mark.parametrize("name", ["mps", "cpu", "cuda", "cuda:1"])
def test_a_device_that_exists_is_taken_as_named(name, monkeypatch):
    pretend(monkeypatch, cuda=True, mps=True, gpus=2)
    assert resolve_device(name, argparse.ArgumentParser()) == torch.device(name)


@pytest.mark.parametrize("name, cuda, mps, message", [
    ("mps", True, False, "--device mps: no Apple MPS device"),
    ("cuda", False, True, "--device cuda: no CUDA GPU"),
    ("cuda:2", True, False, "--device cuda:2: this machine has 2 CUDA GPU(s)"),
    ("cuda:x", True, True, "must be auto, cpu, cuda, cuda:N or mps"),
    ("tpu", True, True, "must be auto, cpu, cuda, cuda:N or mps"),
])
def test_a_missing_or_unknown_device_is_one_line_and_exit_2(
    name, cuda, mps, message, monkeypatch, capsys
):
    pretend(monkeypatch, cuda, mps, gpus=2)
    with pytest.raises(SystemExit) as e:
        resolve_device(name, argparse.ArgumentParser(prog="train.py"))
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and message in last


def test_train_refuses_mps_without_mps_before_writing_anything(monkeypatch, tmp_path, capsys):
    pretend(monkeypatch, cuda=False, mps=False)
    with pytest.raises(SystemExit) as e:
        train.main(["--device", "mps", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and "--device mps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_takes_float16_on_gpus_without_native_bfloat16(capability, dtype, monkeypatch):
    # V100 (7.0) and T4 (7.5) emulate bfloat16 (torch calls it supported); float16 is native
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: asked.append(device) or capability)
    assert amp_dtype("cuda:1") == dtype
    assert asked == [torch.device("cuda:1")], "the GPU asked for, not the current one"
    assert amp_dtype("cpu") == torch.bfloat16
