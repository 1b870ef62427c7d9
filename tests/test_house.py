"""The package's imports point down: no two modules of qtool import each other, even lazily.

Every ``import`` statement is read (function-level ones too: a lazy import is still an arrow),
modules are mapped to their installed names (``backends/x.py`` is ``qtool.backends.x``), and
the strongly connected components of that graph are computed with Tarjan's algorithm. A
circle means two modules that cannot be understood, tested or moved apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Checkout folder -> installed package prefix (the wheel puts these under qtool).
PACKAGES = {"qtool": "qtool", "backends": "qtool.backends", "calibration": "qtool.calibration"}


def _modules() -> dict[str, Path]:
    modules = {"qtool.cli": ROOT / "cli.py"}
    for folder, prefix in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    package = package.rsplit(".", 1)[0]
                base = f"{package}.{base}" if base else package
            # `from qtool.x import y`: y is a module of its own, or a name of qtool.x
            modules = [f"{base}.{alias.name}" for alias in node.names
                       if f"{base}.{alias.name}" in known]
            targets = modules if len(modules) == len(node.names) else [*modules, base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "qtool":
                found.add(target)
    return found


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_the_finder_sees_a_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(edges) == [["a", "b", "c"]]


def test_no_module_of_qtool_imports_one_that_imports_it_back():
    modules = _modules()
    known = set(modules)
    # a package's __init__ importing its children counts: a child that reaches back to the
    # package (a registry of backends that imports the planner that imports the registry)
    # is a circle too
    edges = {name: _imports(path, name, known) for name, path in modules.items()}
    assert _circles(edges) == []
