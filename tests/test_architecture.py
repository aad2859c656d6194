"""The import structure: the floors contract of pyproject.toml holds, and no import circle exists.

Both read refrl's own imports, function-level (lazy) ones included; imports under
``if TYPE_CHECKING:`` never run and are left out. A failure prints the broken contract or
the circle, import by import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grimp

import refrl

SRC = Path(refrl.__file__).resolve().parent.parent
ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def test_imports_keep_the_floors_contract():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
         "--config", str(PYPROJECT), "--no-cache", "--no-logo"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert res.returncode == 0, f"lint-imports (pyproject.toml [tool.importlinter]):\n{res.stdout}{res.stderr}"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(graph: grimp.ImportGraph, component: list[str]) -> str:
    """One circle through the component, each import with its line: ``a:12 -> b``."""
    first = component[0]
    nxt = next(m for m in sorted(graph.find_modules_directly_imported_by(first)) if m in component)
    chain = [first, *graph.find_shortest_chain(importer=nxt, imported=first)]
    steps = []
    for a, b in zip(chain, chain[1:], strict=False):
        lines = [d["line_number"] for d in graph.get_import_details(importer=a, imported=b)]
        steps.append(f"{a}:{','.join(map(str, lines))} -> {b}")
    return f"{len(component)} modules ({', '.join(component)}): " + "; ".join(steps)


def test_no_import_circles():
    graph = grimp.build_graph("refrl", exclude_type_checking_imports=True, cache_dir=None)
    cycles = _cycles(graph)
    assert not cycles, "import circles in refrl:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_the_circle_finder_finds_circles():
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.d", "p.e")]:
        graph.add_import(importer=a, imported=b, line_number=1, line_contents=f"import {b}")
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert _describe(graph, ["p.a", "p.b", "p.c"]).endswith("p.a:1 -> p.b; p.b:1 -> p.c; p.c:1 -> p.a")
