"""Output folders are checked by creating them: every script that writes refuses, before any work,
a folder it could not write, with one line and exit status 2, also when run as root."""

import os
import subprocess
import sys

import pytest

from common import check_writable

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
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_exit_2(result, flag, path):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{flag} {path}" in lines[0] and "not writable" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["train.py", "experiments.py suite", "eval.py predict", "eval.py --save-pred",
                                    "eval.py --out", "bench.py"])
def test_every_script_that_writes_refuses_before_any_work(script, tmp_path):
    # /proc/nope where there is /proc (the case os.access gets wrong for root), else under a file
    path = unwritable_paths(tmp_path)[1 if os.path.isdir("/proc/self") else 0]
    missing = str(tmp_path / "absent.pt")  # checked after the output: the output is refused first
    argv = {"train.py": ["train.py", "--out", path],
            "experiments.py suite": ["experiments.py", "suite", "--out", path],
            "eval.py predict": ["eval.py", "predict", "-i", str(tmp_path), "-o", path, "--checkpoint", missing],
            "eval.py --save-pred": ["eval.py", "--checkpoint", missing, "--save-pred", path],
            "eval.py --out": ["eval.py", "--checkpoint", missing, "--out", path],
            "bench.py": ["bench.py", "exchange", "--out", os.path.join(path, "bench.json")]}[script]
    flag = {"eval.py predict": "-o", "eval.py --save-pred": "--save-pred"}.get(script, "--out")
    shown = argv[argv.index(flag) + 1]
    assert_one_line_exit_2(run(*argv), flag, shown)
