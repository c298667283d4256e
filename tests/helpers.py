"""What the end-to-end tests share: running a command of the checkout, and a run at a tiny size."""

import json
import os
import subprocess
import sys

from checkpoint import MODEL_FILE
from settings import saved

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the phantom at 6 mm: a run end to end on an eighth of the default's voxels (its patches and
# windows are mostly padding there; sampling and blending have tests of their own)
SMALL = ("--spacing", "6", "6", "6")
VARIANTS = ("--marginal", "--condist", "--oracle", "--dropout", "--aggregate", "--weighted")


def run(*args: str, cwd: str = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` in the checkout (`-m experiments ...` for a wing), its output captured."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def tiny(mode: str, out, cache, *extra: str) -> subprocess.CompletedProcess:
    """A run of two sites, two rounds of one step, two cases a site, at 6 mm."""
    script = ("-m", "experiments", "train") if any(a in VARIANTS for a in extra) else ("train.py",)
    return run(*script, "--nodes", "2", "--mode", mode, "--rounds", "2", "--local-steps", "1",
               "--max-cases", "2", "--out", str(out), "--cache", str(cache), *SMALL, *extra)


def finished_run(folder, cfg, *, config=None, model=True, evaluated=False) -> None:
    """A seed's folder as a finished run leaves it: metrics.json (with its config), model.pt, and
    if `evaluated` the test scores eval.py wrote later."""
    folder.mkdir(parents=True, exist_ok=True)
    config = saved(cfg) if config is None else config
    (folder / "metrics.json").write_text(json.dumps({"config": config, "extensions": {}}))
    if model:
        (folder / MODEL_FILE).write_bytes(b"an old model")
    if evaluated:
        (folder / "eval").mkdir()
        (folder / "eval" / "metrics.json").write_text("{}")
