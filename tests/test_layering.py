"""The layering docs/architecture.md draws is the real one: read from every module's imports (lazy ones
included, type-checking ones not), adapters never reach the engine or the CLI, and no module imports
itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dfbf_cli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """dfbf_cli modules imported anywhere in ``path`` except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for statement in block.body for node in ast.walk(statement)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in found if name.startswith("dfbf_cli")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {target for target in _imports(path) if target in modules and target != name} for name, path in modules.items()}


def test_adapters_import_neither_engine_nor_cli():
    wrong = {f"{name} -> {target}" for name, targets in _graph().items() if name.startswith(("dfbf_cli.adapters", "dfbf_cli.contract"))
             for target in targets if target.startswith(("dfbf_cli.engine", "dfbf_cli.cli"))}
    assert not wrong


def test_no_import_cycle():
    graph, done, path = _graph(), set(), []

    def visit(name: str) -> None:
        if name in path:
            raise AssertionError(" -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name] - {"dfbf_cli"}):  # the package root only re-exports
            visit(target)
        path.pop()
        done.add(name)

    for module in sorted(graph):
        visit(module)
