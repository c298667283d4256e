"""`flwr run` that exits non-zero when the run fails (`flwr run` itself exits 0 even when the
ServerApp raised): submit the run, stream its log, then read the run's final status.

    python flower/run.py flower --run-config "rounds=2"
    python flower/run.py flower --federation-config "num-supernodes=4" --run-config "rounds=2"
    cd flower && python run.py . segviz-local --run-config "nodes=2 rounds=2"

The arguments are `flwr run`'s (APP first; a SuperLink connection may follow, else Flower's
default). Processes this starts (a local SuperLink, on first use) find the SegViz modules
through SEGVIZ_ROOT (this checkout), wherever this is run from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flwr() -> str:
    """Flower's command from this interpreter's environment, else the PATH's."""
    here = os.path.join(os.path.dirname(sys.executable), "flwr")
    return here if os.path.exists(here) else "flwr"


def flwr_json(args: list[str], env: dict) -> dict:
    out = subprocess.run(
        [flwr(), *args, "--format", "json"], capture_output=True, text=True, env=env
    )
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(f"flwr {args[0]} failed (exit {out.returncode})") from None


def connection_of(args: list[str]) -> list[str]:
    """The SuperLink connection named after APP, if any (as `flwr log` and `flwr ls` take it)."""
    positional = []
    for i, a in enumerate(args):
        if a.startswith("-"):
            break
        if i == 0 or not args[i - 1].startswith("-"):
            positional.append(a)
    return positional[1:2]


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--stream"] or ["flower"]
    env = {"SEGVIZ_ROOT": ROOT, **os.environ}
    started = flwr_json(["run", *args], env)
    if not started.get("success", True) or "run-id" not in started:
        print(json.dumps(started, indent=1), file=sys.stderr)
        return 1
    run_id, link = str(started["run-id"]), connection_of(args)
    print(f"run {run_id}", flush=True)
    # returns when the run's log ends
    subprocess.run([flwr(), "log", run_id, *link, "--stream"], env=env)
    status = ""
    for _ in range(600):  # the final status can lag the log's last line
        runs = flwr_json(["ls", *link, "--run-id", run_id], env).get("runs", [])
        status = str(runs[0].get("status", "")) if runs else ""
        if status.startswith("finished"):
            break
        time.sleep(0.5)
    print(f"run {run_id}: {status or 'status unknown'}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
