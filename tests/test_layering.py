"""The package's layers, read from its source: no import cycle, and each layer imports only what it may.

Static (``ast``): every import statement that runs, lazy ones inside functions too, so a cycle that
only bites on the first call (``consumer/source.py`` <-> ``consumer/supabase_source.py`` used to be
one) is caught; ``if TYPE_CHECKING:`` imports never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import durability_pipelines

PACKAGE = "durability_pipelines"
ROOT = Path(durability_pipelines.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _executed_imports(path: Path) -> set[str]:
    """Every module name an import statement of ``path`` names (``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for branch in ast.walk(tree)
                   if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                   for stmt in branch.body for node in ast.walk(stmt)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _own_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        targets = {_own_module(t) for t in _executed_imports(path) if t.startswith(PACKAGE)}
        # importing a module runs its packages' __init__ first: that is not an edge back
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert "durability_pipelines.consumer.adapters.supabase" in graph  # the graph is the real one
    assert _cycles(graph) == []


def test_the_source_contract_imports_no_adapter_and_adapters_resolve_no_urls() -> None:
    graph = _graph()
    readers = ("durability_pipelines.consumer.adapters", "durability_pipelines.sources.dynamodb",
               "durability_pipelines.sources.supabase_changes")
    assert not {m for m in graph["durability_pipelines.consumer.source"] if m.startswith(readers)}
    adapters = {name: deps for name, deps in graph.items() if name.startswith(readers[0])}
    assert len(adapters) >= 3
    assert all("durability_pipelines.services" not in deps for deps in adapters.values()), adapters


def test_core_layers_never_import_dagster_or_the_consumer_layer() -> None:
    core = ("durability_pipelines.checkpoints", "durability_pipelines.sources", "durability_pipelines.sinks")
    offenders = {}
    for name, path in MODULES.items():
        if name.startswith(core):
            bad = {t for t in _executed_imports(path) if t.split(".")[0] == "dagster"
                   or (name.startswith(core[:2]) and t.startswith("durability_pipelines.consumer"))}
            if bad:
                offenders[name] = sorted(bad)
    assert offenders == {}
