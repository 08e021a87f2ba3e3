"""The package's import graph: every module imports on its own, and no module imports one that
imports it back (directly or through others)."""
from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import curlprune

SRC = Path(curlprune.__file__).resolve().parent
PACKAGE = "curlprune"


def _modules(directory: Path = SRC, name: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package (packages by their ``__init__.py``) -> its file; imports nothing."""
    found = {name: directory / "__init__.py"}
    for info in pkgutil.iter_modules([str(directory)]):
        if info.ispkg:
            found.update(_modules(directory / info.name, f"{name}.{info.name}"))
        else:
            found[f"{name}.{info.name}"] = directory / f"{info.name}.py"
    return found


MODULES = _modules()

# Imports each module first, with no module of the package loaded yet (third-party modules such as
# torch stay loaded, so this takes seconds): the same as importing it alone in a fresh interpreter,
# as far as the package's own imports go, so an import cycle that breaks that entry point fails.
_CHILD = """
import importlib, json, sys, traceback
failures = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "curlprune" or m.startswith("curlprune.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failures[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
print(json.dumps(failures))
"""


@pytest.fixture(scope="module")
def fresh_import_failures() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _CHILD, *sorted(MODULES)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_walk_finds_the_package():
    assert {"curlprune.cli", "curlprune.channels", "curlprune.graph", "curlprune.models.registry"} <= set(MODULES)
    assert all(path.is_file() for path in MODULES.values())


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_alone(name, fresh_import_failures):
    assert name not in fresh_import_failures, f"importing {name} first fails: {fresh_import_failures[name]}"


def _imports_of(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (module level, in functions, under
    ``if TYPE_CHECKING``), resolved to modules: ``from a.b import c`` is ``a.b.c`` when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # import a.b.c of a module a.b.c? else its package
                target = target.rpartition(".")[0]
            if target.split(".")[0] == PACKAGE and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []


def test_no_import_cycles():
    graph = {name: _imports_of(name, path) for name, path in MODULES.items()}
    cycles = _cycles(graph)
    described = []
    for component in cycles:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        described.append("{" + ", ".join(component) + "}: " + "; ".join(edges))
    assert not cycles, "import cycles among the package's modules:\n" + "\n".join(described)
