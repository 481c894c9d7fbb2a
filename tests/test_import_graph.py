"""No import cycle between the modules of the tuneforge package.

The graph is built from the source with `ast`, without importing anything. A node is a module
(`tuneforge/a/b.py` is `tuneforge.a.b`, `tuneforge/a/__init__.py` is `tuneforge.a`). An edge
A -> B is an import of B executed when A is imported:

- `import tuneforge.x.y` and `from tuneforge.x import y` (where `y` is a module) point at
  `tuneforge.x.y`; `from tuneforge.x import name` (where `name` is not a module) points at
  `tuneforge.x`. Relative imports are resolved the same way.
- Only statements that run on import count: module level, including module-level `if`/`try`/
  `with` blocks and class bodies. Imports inside a function run later, on call, and are not
  edges; imports under `if TYPE_CHECKING:` never run and are not edges either.
- The parent packages Python initialises on the way (`tuneforge`, `tuneforge.x`) are not edges:
  a package `__init__` that re-exports its children would otherwise close a loop with every child.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tuneforge

ROOT = Path(tuneforge.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _module_level_imports(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            found += _module_level_imports(node.body)
    return found


def _all_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    return [n for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom)]


def import_graph(on_import_only: bool = True) -> dict[str, set[str]]:
    """Module -> the tuneforge modules it imports when imported (or anywhere, with
    `on_import_only=False`)."""
    collect = _module_level_imports if on_import_only else _all_imports
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in collect(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in paths else module
                    for alias in node.names
                ]
            edges |= {t for t in targets if t in paths and t != name}
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component with more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "tuneforge.storage.filesystem" in graph
    assert "tuneforge.storage.base" in graph["tuneforge.storage.filesystem"]


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert find_cycles(import_graph()) == []


def test_the_store_interface_imports_no_backend() -> None:
    """Not even inside a function: backends import the interface, `tuneforge.storage` picks one."""
    graph = import_graph(on_import_only=False)
    backends = {"tuneforge.storage.filesystem", "tuneforge.storage.s3"}
    assert not graph["tuneforge.storage.base"] & backends
    assert "tuneforge.storage.base" in graph["tuneforge.storage.s3"]
