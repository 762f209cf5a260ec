"""Layering: no import cycle inside embedsearch/, and the storage layers import light.

Every import statement counts: top-level, inside functions, under ``TYPE_CHECKING``, and
``importlib.import_module("embedsearch.…")`` with a literal name. A cycle hidden in a
function still ties the modules together (each needs the other to be understood, tested
and changed), so the graph of all of them must be acyclic.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "embedsearch"

#: Cycles known and owned elsewhere, each listed exactly. The report package's cycle
#: (report/build.py <-> report/study.py) goes when report/study.py is split into compute and
#: render (issue #18, engineer "report"): remove it from here then.
KNOWN_CYCLES: set[frozenset[str]] = {
    frozenset({"embedsearch.report.build", "embedsearch.report.study"}),
}


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a folder)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _target(name: str, modules: Iterable[str]) -> str | None:
    """The module ``name`` refers to: itself, or its longest prefix that is a module."""
    known = set(modules)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, counting every import statement."""
    modules = module_files(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - node.level + is_pkg]
                    src = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    src = node.module or ""
                # `from pkg import sub` imports the submodule; `from mod import name`, mod.
                names = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src
                         for a in node.names]
            elif isinstance(node, ast.Call) and node.args \
                    and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) \
                    and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                                   "__import__"):
                names = [node.args[0].value]
            for name in names:
                target = _target(name, modules)
                if target is not None and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One import loop through ``component``, as ``a -> b -> … -> a`` (for messages)."""
    members, start = set(component), component[0]
    prev: dict[str, str] = {}
    todo = [start]
    while todo:  # breadth-first from start back to start, inside the component
        v = todo.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return " -> ".join([*reversed(path), start])
            if w not in prev:
                prev[w] = v
                todo.append(w)
    return " <-> ".join(component)


def test_no_import_cycle_inside_the_package() -> None:
    graph = import_graph(PACKAGE)
    new = [c for c in cycles(graph) if frozenset(c) not in KNOWN_CYCLES]
    assert not new, "import cycles inside embedsearch/:\n" + "\n".join(
        f"  {cycle_path(graph, c)}  ({len(c)} modules: {', '.join(c)})" for c in new)


def test_known_cycles_are_still_there() -> None:
    """A known cycle that was fixed must leave KNOWN_CYCLES (else it could come back)."""
    present = {frozenset(c) for c in cycles(import_graph(PACKAGE))}
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in present]
    assert not gone, f"these cycles are fixed: remove them from KNOWN_CYCLES: {gone}"


def test_the_graph_counts_imports_in_functions_and_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import importlib\n\ndef g():\n"
                              "    return importlib.import_module('pkg.a')\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.a"}
    (loop,) = cycles(graph)
    assert loop == ["pkg.a", "pkg.c", "pkg.sub.b"]
    assert cycle_path(graph, loop) == "pkg.a -> pkg.sub.b -> pkg.c -> pkg.a"


@pytest.mark.parametrize("module", ["embedsearch", "embedsearch.bundle",
                                    "embedsearch.classify", "embedsearch.predict"])
def test_storage_and_prediction_layers_import_no_model_runtime(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('torch', 'faiss', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"
