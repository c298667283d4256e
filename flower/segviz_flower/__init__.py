"""SegViz over Flower: the ServerApp (server_app.py), the ClientApp (client_app.py) and what
both use (task.py).

The app is this package alone (the FAB); the SegViz modules it trains with (the core: fl, segviz,
train, ...; and experiments.robust) are those of a checkout on each machine. They are found, in
order: already importable (PYTHONPATH), $SEGVIZ_ROOT, the checkout this package sits in (when run
from source), the working directory (where `flwr run`, the SuperLink or the SuperNode was started).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

MARKER = "segviz.py"  # a module only the SegViz checkout has at its top level


def _segviz_root() -> str | None:
    """The folder holding the SegViz modules, or None when they are importable already."""
    if (
        importlib.util.find_spec("train") is not None
        and importlib.util.find_spec("segviz") is not None
    ):
        return None
    candidates = [
        os.environ.get("SEGVIZ_ROOT", ""),
        str(Path(__file__).resolve().parents[2]),
        os.getcwd(),
    ]
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, MARKER)):
            return os.path.abspath(folder)
    raise ImportError(
        "the SegViz modules (segviz.py, train.py, ...) are not importable here: set "
        "SEGVIZ_ROOT to a checkout of the repository, or start flwr run / the SuperLink / the "
        "SuperNode from one"
    )


if (_root := _segviz_root()) is not None and _root not in sys.path:
    sys.path.insert(0, _root)
