"""Small helpers every script shares: files written whole or not at all, the one-line failure,
output folders checked before any work, the choice of device and the type it computes in
under mixed precision."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable
from typing import NoReturn

import torch


def write_atomic(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it to `path`: a reader
    (or a run resumed after a kill) never sees half a file, and a failed write leaves none.
    `suffix` ends the temporary name, for writers that pick the format by it (nibabel)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}{suffix}"
    )
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch_atomic(obj: object, path: str) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr naming the thing and the problem, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_writable(path: str, flag: str, file: bool = False) -> None:
    """Fail before any work unless the folder `path` (with `file`: the folder of the file `path`)
    can be created and written to; leaves the disk as it was.

    Asking os.access would be simpler, but it answers yes to root everywhere, /proc and read-only
    mounts included; only creating the folder and a file in it tells. The folders created here are
    removed again, so that an error found later (bad data) leaves nothing behind."""
    full = os.path.abspath(path)
    if file:
        if os.path.isdir(full):
            fail(f"{flag} {path}: is a folder, not a file")
        full = os.path.dirname(full)
    elif os.path.lexists(full) and not os.path.isdir(full):
        fail(f"{flag} {path}: exists and is not a folder")
    created, probe = [], full
    while not os.path.lexists(probe):
        created.append(probe)  # deepest first
        probe = os.path.dirname(probe)
    try:
        os.makedirs(full, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=full, prefix=".write-check-")
        os.close(handle)
        os.remove(tmp)
    except OSError as e:
        fail(f"{flag} {path}: not writable ({e.strerror or type(e).__name__})")
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def auto_device() -> torch.device:
    """A CUDA GPU, else Apple's MPS, else the CPU."""
    mps = torch.backends.mps.is_available()
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")


def resolve_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    """--device: auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda[:N] or mps; one
    clear line and exit 2 for a device this machine does not have."""
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return auto_device()
    if name not in ("cpu", "cuda", "mps") and not (name.startswith("cuda:") and name[5:].isdigit()):
        parser.error(f"--device {name}: must be auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {name}: no CUDA GPU is available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        parser.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if name == "mps" and not mps:
        parser.error(f"--device {name}: no Apple MPS device is available on this machine")
    return torch.device(name)


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The type --amp computes in: bfloat16, whose range is float32's (no gradient scaling),
    where the device computes in it natively; float16 on CUDA GPUs older than Ampere (compute
    capability below 8: V100, T4), which only emulate bfloat16, slowly."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """The forward pass's context: autocast to `dtype`, or float32 throughout when None."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
