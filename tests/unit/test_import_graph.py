"""The import graph of ``service/``: no module imports itself through others, and the engine
(a plain library) imports nothing of the service around it.

The graph is read from the source with ``ast``: every ``import`` statement counts, at module
level or inside a function alike (a deferred import still ties the two modules together).
Only imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import service

ROOT = Path(service.__file__).resolve().parent
ENGINE_MUST_NOT_IMPORT = ("service.api", "service.jobs", "service.storage", "service.worker")

# Circles inside the engine that the engine restructure removes; nothing else may join them.
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    skipped.update(id(n) for n in ast.walk(stmt))
    return skipped


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """Module -> the ``service`` modules it imports."""
    paths = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph: dict[str, frozenset[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in paths)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    if submodule in paths:
                        deps.add(submodule)  # ``from package import module``
                    elif module in paths:
                        deps.add(module)
        deps.discard(name)
        graph[name] = frozenset(deps)
    return graph


def circles(graph: dict[str, frozenset[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_cycle(graph: dict[str, frozenset[str]], component: frozenset[str]) -> list[str]:
    """A path a -> b -> ... -> a through ``component`` (for the failure message)."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                todo.append(w)
    raise AssertionError(f"no cycle through {sorted(component)}")


def _describe(found: list[frozenset[str]]) -> str:
    graph = import_graph()
    return "; ".join(" -> ".join(one_cycle(graph, c)) for c in found)


def test_the_graph_sees_module_and_function_level_imports() -> None:
    graph = import_graph()
    assert "service.jobs.record" in graph["service.jobs.store"]  # module level
    assert "service.api.auth" in graph["service.api"]  # inside create_app
    assert "service.engine.search" in graph["service.engine.compress"]  # inside a function


def test_no_import_circles() -> None:
    found = circles(import_graph())
    assert not found, f"import circles: {_describe(found)}"


def test_the_engine_imports_nothing_of_the_service_around_it() -> None:
    bad = {
        module: sorted(d for d in deps
                       if any(d == p or d.startswith(p + ".") for p in ENGINE_MUST_NOT_IMPORT))
        for module, deps in import_graph().items()
        if module.startswith("service.engine")
    }
    assert not {m: d for m, d in bad.items() if d}
