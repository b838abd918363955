"""The data layer imports downwards only: its modules form no cycle and import one
another at module level, so any of them can be the first a process (a Ray worker
unpickling a class) imports."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import forgeml.data

DATA = Path(forgeml.data.__file__).parent


def _data_imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("forgeml.data"):
            names = [] if node.module != "forgeml.data" else [a.name for a in node.names]
            found |= {f"forgeml.data.{n}" for n in names} or {node.module}
    return found


def test_the_data_modules_import_one_another_without_a_cycle():
    graph = {
        f"forgeml.data.{path.stem}": _data_imports(ast.parse(path.read_text()))
        for path in DATA.glob("*.py")
        if path.stem != "__init__"
    }
    order = list(graphlib.TopologicalSorter(graph).static_order())
    assert order.index("forgeml.data.base") < order.index("forgeml.data.pipeline")


def test_no_data_module_imports_another_inside_a_function():
    for path in DATA.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert not _data_imports(node), f"{path.name}: {node.name} imports lazily"
