"""The house's rules, read from broker/'s source: no module reads another's private names, and
the imports between wings (the subpackages) run one way."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

from broker.server.hooks import UVICORN_HOOKS

BROKER = Path(__file__).parents[1] / "broker"
MODULES = sorted(BROKER.rglob("*.py"))
# Privates of a dependency that the code relies on, each listed in server/hooks.py.
DEPENDENCY_PRIVATES = {
    hook.removeprefix("self.")
    for hooks in UVICORN_HOOKS.values()
    for hook in hooks
    if hook.removeprefix("self.").startswith("_")
}


def defined_privates(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, `self._x` and slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # `__slots__` entries
    return {name for name in names if name.startswith("_")}


def test_no_module_reads_another_modules_private_names() -> None:
    foreign: list[str] = []
    for path in MODULES:
        tree = ast.parse(path.read_text())
        own = defined_privates(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            if node.attr.startswith("__") or node.attr in own | DEPENDENCY_PRIVATES:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os", "sys"):
                continue
            foreign.append(f"{path.relative_to(BROKER)}:{node.lineno}: .{node.attr}")
    assert foreign == []


def wing_imports() -> dict[str, set[str]]:
    """For each wing, the other wings its modules import."""
    wings = {p.parent.name for p in BROKER.glob("*/__init__.py")}
    graph: dict[str, set[str]] = {wing: set() for wing in wings}
    for path in MODULES:
        wing = path.parent.name
        if wing not in wings:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                target = node.module.split(".")[0]
                if target in wings and target != wing:
                    graph[wing].add(target)
    return graph


def test_imports_between_wings_run_one_way() -> None:
    graph = wing_imports()
    assert graph["web"] >= {"server", "config"}  # the walk sees imports (it can fail)
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError if not
    assert sorted(order) == sorted(graph)
