"""Every midog module imports on its own, and no two midog modules import each other.

A module that works only after another has been imported, or two modules that import each other (which works or
fails depending on which of them is imported first), pass every test that happens to import them in a lucky order.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = REPO_ROOT / "midog"

KNOWN_DEFERRED_CYCLES: dict[tuple[str, str], str] = {}
"""Edges of import cycles closed only by an import inside a function, still to break: each one must still exist
(remove it here once it is gone)."""


def module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package (`__main__` left out: importing it runs it)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(body: list[ast.stmt], deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module is imported: module level, in `if`/`try`/`with` blocks and
    class bodies too, not under `if TYPE_CHECKING:`; with `deferred`, also those inside functions."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif _is_type_checking(node):
            found += _imports(node.orelse, deferred)
        elif deferred or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                found += _imports([n for n in getattr(node, field, []) if isinstance(n, ast.AST)], deferred)
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names the statement imports: the modules, and for `from m import n` also `m.n` (a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """midog module → the midog modules it imports (see `_imports`)."""
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        statements = _imports(ast.parse(path.read_text(encoding="utf-8")).body, deferred)
        graph[module] = {target for node in statements for target in _targets(node, module, is_package)
                         if target in modules and target != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a]; empty when it has none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_imports_in_every_form():
    graph = import_graph(deferred=True)
    assert "midog.errors" in graph["midog.config"]                 # from midog.errors import ...
    assert "midog.image_files" in graph["midog.stack_io"]
    assert "midog.evaluate.io" in graph["midog.evaluate"]           # a package's __init__
    assert "midog.roi_io" not in import_graph()["midog.tiling"]    # under `if TYPE_CHECKING:` only


def test_no_midog_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert not cycle, f"import cycle at module level: {' -> '.join(cycle)}"


def test_no_import_cycle_is_hidden_in_a_function():
    graph = import_graph(deferred=True)
    for importer, imported in KNOWN_DEFERRED_CYCLES:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: drop it from the known cycles"
        graph[importer].discard(imported)
    cycle = find_cycle(graph)
    assert not cycle, f"import cycle through an import inside a function: {' -> '.join(cycle)}"


def test_every_module_imports_alone_in_a_fresh_interpreter():
    def import_alone(module: str) -> str:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=600, stdin=subprocess.DEVNULL)
        lines = result.stderr.strip().splitlines()
        return "" if result.returncode == 0 else f"{module}: {lines[-1] if lines else f'exit {result.returncode}'}"

    modules = sorted(module_files())
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        failures = [failure for failure in pool.map(import_alone, modules) if failure]
    assert not failures, "\n".join(failures)
