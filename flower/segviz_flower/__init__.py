"""SegViz over Flower: the ServerApp (server_app.py), the ClientApp (client_app.py) and what
both use (task.py).

The app is this package alone (the FAB); the SegViz modules it trains with (the core: fl, segviz,
train, ...; and experiments.robust) are those of a checkout on each machine. They are found, in
order: already importable (PYTHONPATH), $SEGVIZ_ROOT, the checkout this package sits in (when run
from source), the working directory (where `flwr run`, the SuperLink or the SuperNode was started)
and the folders above it (`cd flower && flwr run .` from a checkout).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

MARKERS = ("segviz.py", "train.py")  # modules only the SegViz checkout has at its top level


def find_checkout(env_root: str, package_file: str, cwd: str) -> str | None:
    """The first folder holding the SegViz modules among $SEGVIZ_ROOT (`env_root`), the checkout
    `package_file` sits in, `cwd` and the folders above `cwd`; None when none does."""
    here, start = Path(package_file).resolve(), Path(cwd).resolve()
    places = [Path(env_root)] if env_root else []
    places += [*here.parents[2:3], start, *start.parents]
    for folder in places:
        if all((folder / marker).is_file() for marker in MARKERS):
            return str(folder.resolve())
    return None


def _segviz_root() -> str | None:
    """The folder holding the SegViz modules, or None when they are importable already."""
    if (
        importlib.util.find_spec("train") is not None
        and importlib.util.find_spec("segviz") is not None
    ):
        return None
    root = find_checkout(os.environ.get("SEGVIZ_ROOT", ""), __file__, os.getcwd())
    if root is None:
        raise ImportError(
            "the SegViz modules (segviz.py, train.py, ...) are not importable here: set "
            "SEGVIZ_ROOT to a checkout of the repository, or start flwr run / the SuperLink / "
            "the SuperNode in one"
        )
    return root


if (_root := _segviz_root()) is not None and _root not in sys.path:
    sys.path.insert(0, _root)
