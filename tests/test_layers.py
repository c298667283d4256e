"""The shape of the code: a flat core at the root that the main command alone imports, wings in
folders that import the core and are never imported by it, imports that point one way only,
and lines a reader does not have to scroll."""

import ast
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, SMALL

# Lowest first. A module may import modules of its own layer or of a layer below, never above;
# a root module is a layer's entry by its name, a wing by its folder's.
LAYERS = [
    ("common",),  # files written whole, one-line failures, devices
    ("data", "unet3d", "metrics"),  # the data vocabulary, the network, the metrics
    # the round, the built-in federation, the sampler, tables
    ("fl", "phantom", "sampler", "report"),
    ("segviz",),  # the modes: what each shares, the meta-model and its merge
    ("settings",),  # a run's settings
    ("cases", "checkpoint"),  # where a run's cases come from; what it leaves behind
    ("eval",),  # inference and scoring
    ("train",),  # the run
    ("realdata",),  # wing: real data
    ("experiments", "bench"),  # wings: experiments, benchmarks
    ("flower",),  # wing: the Flower app
]
CORE = {name for layer in LAYERS[:LAYERS.index(("realdata",))] for name in layer}
# the one place the core reaches a wing: real data, when a run names it (cases.real_data)
ALLOWED_UPWARD = {("cases", "real_data", "realdata.federation")}
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def python_files() -> list[str]:
    """Every module of the checkout, tests aside, as paths relative to the root."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith((".", "__")) and d not in ("tests", "runs", "data")
        )
        found += [
            os.path.relpath(os.path.join(folder, f), ROOT)
            for f in sorted(files)
            if f.endswith(".py")
        ]
    return found


def module_name(path: str) -> str:
    parts = path[:-3].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: str) -> list[tuple[str, str]]:
    """(the enclosing function or "", the imported module) of every import in a file, resolved
    to the project's module names (relative imports included)."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    package = (
        module_name(path) if path.endswith("__init__.py") else module_name(path).rpartition(".")[0]
    )
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = (
                child.name
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                else function
            )
            if isinstance(child, ast.Import):
                found.extend((function, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*up, base] if base else up)
                found.append((function, base))
                found.extend((function, f"{base}.{a.name}") for a in child.names)
            visit(child, name)

    visit(tree, "")
    return found


def project_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (a name that is a module of the checkout)."""
    modules = {module_name(p): p for p in python_files()}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for _, m in imports(path) if m in modules and m != name}
    return graph


def layer(module: str) -> int:
    return LAYER_OF[module.split(".")[0]]


def test_every_module_belongs_to_a_layer():
    tops = {module_name(p).split(".")[0] for p in python_files()}
    assert tops == set(LAYER_OF), "a module without a layer, or a layer without modules"


def test_no_import_points_up_a_layer():
    upward = []
    for path in python_files():
        me = module_name(path)
        for function, target in imports(path):
            top = target.split(".")[0]
            if (
                top in LAYER_OF
                and layer(target) > layer(me)
                and (me, function, target) not in ALLOWED_UPWARD
            ):
                upward.append(f"{path} ({function or 'module'}) imports {target}")
    assert upward == []


def test_no_import_circle():
    graph = project_graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert circles == []


def test_the_core_never_imports_a_wing_but_through_the_one_function():
    wings = set(LAYER_OF) - CORE
    for path in python_files():
        if module_name(path).split(".")[0] in CORE:
            reached = {
                (module_name(path), f, t) for f, t in imports(path) if t.split(".")[0] in wings
            }
            assert reached <= ALLOWED_UPWARD, path


def test_no_line_is_longer_than_100_characters():
    tests = [
        os.path.relpath(os.path.join(d, f), ROOT)
        for d, _, fs in os.walk(os.path.join(ROOT, "tests"))
        for f in fs
        if f.endswith(".py")
    ]
    long = []
    for path in python_files() + tests:
        with open(os.path.join(ROOT, path)) as f:
            long += [f"{path}:{i}" for i, line in enumerate(f, 1) if len(line.rstrip("\n")) > 100]
    assert long == []


def project_modules_after(code: str) -> list[str]:
    """The checkout's modules that `code`, run in a fresh interpreter from the root, leaves in
    sys.modules."""
    probe = (
        f"import json, os, sys\n{code}\nroot = os.path.realpath(os.getcwd())\ndef mine(m):\n    "
        "path = getattr(m, '__file__', None)\n    return bool(path) and os.path.isfile(path) and "
        "os.path.realpath(path).startswith(root + os.sep)\nprint(json.dumps(sorted(n for n, m in "
        "list(sys.modules.items()) if n not in ('__main__', '__mp_main__') and mine(m))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_main_command_imports_the_core_only():
    loaded = project_modules_after("import train")
    assert set(loaded) <= CORE and "train" in loaded and "segviz" in loaded


@pytest.mark.slow
def test_a_run_of_the_main_command_imports_the_core_only(tmp_path, cache):
    argv = [
        "train.py",
        "--nodes",
        "2",
        "--rounds",
        "1",
        "--local-steps",
        "1",
        "--max-cases",
        "1",
        *SMALL,
        "--cache",
        str(cache),
        "--out",
        str(tmp_path / "run"),
    ]
    code = ("import runpy\n"
            f"sys.argv = {argv!r}\ntry:\n    runpy.run_path('train.py', "
            "run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n")
    loaded = project_modules_after(code)
    assert set(loaded) <= CORE, sorted(set(loaded) - CORE)
    assert (tmp_path / "run" / "seed-0" / "model.pt").exists()
