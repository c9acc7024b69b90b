"""The package's import graph has no cycle, even counting imports inside functions; framework/
imports no other vtprune package; no module of adapters/ or experiments/ is over 500 lines.

The graph is read with `ast` (nothing is imported): every ``import vtprune.x`` / ``from vtprune.x
import y`` / ``from . import y`` / ``from .x import y`` of every module of the vtprune package
(the repository root), ``if TYPE_CHECKING:`` blocks left out (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_FOLDERS = {"tests", "benchmarks", "docs"}
MAX_LINES = 500

#: Packages whose modules must stay short (issue 12: adapters and experiments had 800-1000 line modules).
SHORT_PACKAGES = ("vtprune.adapters", "vtprune.experiments")


def package_modules() -> dict[str, tuple[Path, bool]]:
    """``{"vtprune.x.y": (file, is_package)}`` for every module of the package."""
    found: dict[str, tuple[Path, bool]] = {}

    def visit(folder: Path, name: str) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_dir() and (path / "__init__.py").is_file() and path.name not in SKIPPED_FOLDERS:
                visit(path, f"{name}.{path.name}")
            elif path.suffix == ".py":
                is_package = path.stem == "__init__"
                found[name if is_package else f"{name}.{path.stem}"] = (path, is_package)

    visit(ROOT, "vtprune")
    return found


def _is_type_checking(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(body: list[ast.stmt], function_level: bool) -> Iterator[ast.stmt]:
    """Import statements that run when the module runs (and, with ``function_level``, in its functions)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif _is_type_checking(node):
            yield from _imports(list(getattr(node, "orelse", [])), function_level)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if function_level:
                yield from _imports(node.body, function_level)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    yield from _imports([c for c in children if isinstance(c, ast.AST)], function_level)  # type: ignore[misc]


def import_graph(function_level: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text()).body, function_level):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _show(found: set[frozenset[str]]) -> str:
    return "; ".join(" <-> ".join(sorted(c)) for c in sorted(found, key=sorted)) or "none"


def test_the_graph_reader_sees_relative_and_package_imports() -> None:
    graph = import_graph()
    assert "vtprune.experiments.samples" in graph["vtprune.experiments.metrics"]  # from .samples import ...
    assert "vtprune.experiments.cost" in graph["vtprune.experiments.metrics"]  # from . import cost
    assert "vtprune.framework.typecheck" in graph["vtprune.framework.params"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_import_cycle_in_the_package() -> None:
    found = cycles(import_graph())
    assert found == set(), f"import cycles: {_show(found)}"


def test_no_cycle_even_through_imports_inside_functions() -> None:
    found = cycles(import_graph(function_level=True))
    assert found == set(), f"import cycles (imports inside functions included): {_show(found)}"


def test_framework_imports_no_other_vtprune_package() -> None:
    upward = {
        module: sorted(t for t in targets if not t.startswith("vtprune.framework"))
        for module, targets in import_graph(function_level=True).items()
        if module.startswith("vtprune.framework")
    }
    assert {m: t for m, t in upward.items() if t} == {}


def test_former_circles_are_gone() -> None:
    graph = import_graph(function_level=True)
    assert "vtprune.framework.catalog" not in graph["vtprune.framework.compose"]
    assert "vtprune.framework.catalog" not in graph["vtprune.framework.pipeline"]
    assert "vtprune.framework.registry" not in graph["vtprune.framework.hookspecs"]
    assert "vtprune.experiments.config" not in graph["vtprune.experiments.tasks"]


def test_no_adapters_or_experiments_module_over_500_lines() -> None:
    long = {
        name: len(path.read_text().splitlines())
        for name, (path, _) in package_modules().items()
        if name.startswith(SHORT_PACKAGES) and len(path.read_text().splitlines()) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"
