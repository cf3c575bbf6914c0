"""The import graph of src/conceptstream: no cycles between modules, and the world stays at the edge.

Every ``import`` / ``from ... import`` of a conceptstream module counts, at module level or inside a
function (a lazy import is still a dependency). ``from pkg import name`` counts as an import of
``pkg.name`` when that is a module, else of ``pkg``. Not counted: the lazy re-exports in a
package ``__init__``'s module-level ``__getattr__`` (a convenience for users, e.g.
``conceptstream.learn``), which no module of the package relies on.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "conceptstream"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _lazy_reexport_nodes(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside a module-level ``def __getattr__`` (package facades)."""
    ids: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            ids |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return ids


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, or its closest enclosing package that exists."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the conceptstream modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _lazy_reexport_nodes(tree) if path.name == "__init__.py" else set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for t in targets:
                if t == PACKAGE or t.startswith(PACKAGE + "."):
                    target = _resolve(t, modules)
                    if target and target != mod:
                        graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle inside a strongly connected component, for the failure message."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [w for w in nxt if w not in seen]
        if not fresh:
            return path + [nxt[0]] if nxt else path
        path.append(fresh[0])
        seen.add(fresh[0])


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "conceptstream.api" in graph["conceptstream.evaluation.bench.run"]  # imported inside a method
    assert "conceptstream.evaluation.variants" in graph["conceptstream.evaluation.bench.settings"]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(_path_in(c, graph)) for c in found)


def test_the_api_does_not_know_the_bench():
    graph = import_graph()
    assert not any(t.startswith("conceptstream.evaluation.bench") for t in graph["conceptstream.api"])


def test_only_the_world_cli_and_demo_import_the_world():
    graph = import_graph()
    allowed = {"conceptstream.cli", "conceptstream.demo"}
    offenders = sorted(f"{mod} -> {t}" for mod, targets in graph.items() for t in targets
                       if t.startswith("conceptstream.world") and not mod.startswith("conceptstream.world")
                       and mod not in allowed)
    assert not offenders, "modules outside world/, cli.py and demo.py that import the world:\n" + "\n".join(offenders)
