"""The shape of the code: train.py is a script that nothing imports, and every module stays
readable in one sitting (at most 500 lines; the main command's path at most 800)."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "flower", "**", "*.py"),
                                                                     recursive=True))


def imported(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_train():
    assert len(MODULES) > 15
    importers = [os.path.relpath(p, ROOT) for p in MODULES if "train" in imported(p)]
    assert importers == []


def lines(path: str) -> int:
    with open(path) as f:
        return len(f.readlines())


def test_every_module_is_at_most_500_lines():
    long = {os.path.relpath(p, ROOT): n for p in MODULES if (n := lines(p)) > 500}
    assert long == {}


def test_the_method_reads_in_one_sitting():
    # the network, what is shared, a round, and the script of the main command
    path = ("unet3d.py", "segviz.py", "fl.py", "train.py")
    assert sum(lines(os.path.join(ROOT, f)) for f in path) <= 800
