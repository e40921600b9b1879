"""The package's import structure: no cycles, and no imports hidden inside functions.

The layer contracts themselves are checked by ``lint-imports`` (``[tool.importlinter]`` in
pyproject.toml), which ``make test`` runs before pytest. These tests add what a layers contract
does not see: a cycle between two modules of the same layer (e.g. ``search.loop`` and
``search.finalize``) and an in-function ``import mergetune...``, which is how cycles used to be hidden.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

import mergetune

PACKAGE_DIR = Path(mergetune.__file__).parent


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns every component of more than one module (a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected_components(edges) == [["a", "b", "c"]]
    assert strongly_connected_components({"a": {"b"}, "b": set()}) == []


def test_package_has_no_import_cycle():
    """Every import counts, including those inside functions and under TYPE_CHECKING.

    A package ``__init__`` that re-exports its submodules is not an edge back from them: importing
    ``mergetune.x.y`` runs ``mergetune.x``'s ``__init__`` first by Python's rules, not by choice.
    """
    graph = grimp.build_graph("mergetune")
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        edges[module] = {
            imported
            for imported in graph.find_modules_directly_imported_by(module)
            if not module.startswith(imported + ".")  # a module importing its own parent package
        }
    assert strongly_connected_components(edges) == []


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of each ``import mergetune...`` that sits inside a function body."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("mergetune")):
                found.append((inner.lineno, inner.module or "."))
            elif isinstance(inner, ast.Import):
                found += [(inner.lineno, a.name) for a in inner.names if a.name.startswith("mergetune")]
    return found


# The command line imports each command's implementation when that command runs, so that
# `mergetune --help` or a config error answers in about a second instead of loading torch, ray and
# transformers first (7-15 s here). Nothing imports the CLI, so these imports cannot hide a cycle.
LAZY_COMMAND_MODULES = ("cli.py", "demo.py")
# Package modules that wrap a heavy optional dependency and are imported only where it is used.
HEAVY_OPTIONAL_MODULES = {
    "mergetune.search.ray_executor": "imports ray (and needs its runtime) only for searches that run on Ray",
}


def test_no_package_import_inside_a_function():
    """In-function imports are kept for heavy optional dependencies only (ray, matplotlib, mergekit...)."""
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if str(path.relative_to(PACKAGE_DIR)) in LAZY_COMMAND_MODULES:
            continue
        for line, module in function_level_imports(path.read_text()):
            if module in HEAVY_OPTIONAL_MODULES:
                continue
            offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {module}")
    assert offenders == []


def test_function_level_import_finder_sees_nested_imports():
    source = "def f():\n    if True:\n        from mergetune.recipe import Recipe\n    import json\n"
    assert function_level_imports(source) == [(3, "mergetune.recipe")]
