"""The package's import graph: no cycle anywhere (imports under `if TYPE_CHECKING:` and inside functions
count too), and the dependency rule of the hexagon:

- domain/ imports only the standard library (and itself);
- application/ imports only the standard library, domain/ and itself (no third-party package, no adapter);
- adapters/ never import bootstrap (only bootstrap knows concrete classes and wires them).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("domain", "application", "adapters")
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}

Graph = Mapping[str, Iterable[str]]


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name → file, for every module under the layers, plus bootstrap."""
    modules = {"bootstrap": root / "bootstrap.py"}
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name `path` imports, wherever the import statement is (functions, TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from package import module` imports the module itself.
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def project_target(name: str, modules: Mapping[str, Path]) -> str | None:
    """The project module an import name refers to (the longest known prefix), None when outside."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module → project modules it imports, project module → outside top-level packages)."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {}
    outside: dict[str, set[str]] = {}
    for module, path in modules.items():
        graph[module], outside[module] = set(), set()
        for name in imported_names(path, module):
            target = project_target(name, modules)
            if target is not None and target != module and not module.startswith(f"{target}."):
                graph[module].add(target)
            elif target is None:
                outside[module].add(name.split(".")[0])
    return graph, outside


def find_cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one member (or a self-import), each sorted:
    every import cycle lies within one of them (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    nodes = set(graph) | {t for targets in graph.values() for t in targets}
    for start in sorted(nodes):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph.get(start, ())))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop(0)
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    cycles.append(sorted(component))
    return cycles


# --- the cycle finder itself -------------------------------------------------------------------------------


def test_the_cycle_finder_finds_a_cycle_hidden_behind_a_longer_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def test_the_cycle_finder_finds_two_cycles_and_a_self_import() -> None:
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}, "s": {"s"}, "x": {"a", "c"}}
    assert sorted(find_cycles(graph)) == [["a", "b"], ["c", "d"], ["s"]]


def test_the_cycle_finder_accepts_a_diamond() -> None:
    assert find_cycles({"top": {"left", "right"}, "left": {"base"}, "right": {"base"}, "base": set()}) == []


def test_imports_under_type_checking_and_in_functions_count(tmp_path: Path) -> None:
    for package in LAYERS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "bootstrap.py").write_text("")
    (tmp_path / "application" / "one.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from application.two import Two\n"
    )
    (tmp_path / "application" / "two.py").write_text("def late():\n    from application import one\n")
    graph, _ = import_graph(tmp_path)
    assert graph["application.one"] == {"application.two"}
    assert graph["application.two"] == {"application.one"}
    assert find_cycles(graph) == [["application.one", "application.two"]]


# --- the project --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph()


def test_the_walk_sees_the_whole_package(graph: tuple[dict[str, set[str]], dict[str, set[str]]]) -> None:
    imports, _ = graph
    assert {"bootstrap", "domain.messages", "application.answer_message", "adapters.inbound.http"} <= set(
        imports
    )
    assert "application.answer_message" in imports["bootstrap"]


def test_no_import_cycle(graph: tuple[dict[str, set[str]], dict[str, set[str]]]) -> None:
    imports, _ = graph
    assert find_cycles(imports) == []


def test_the_domain_imports_only_the_standard_library(
    graph: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    imports, outside = graph
    for module in (m for m in imports if m.split(".")[0] == "domain"):
        assert outside[module] <= STDLIB, (module, outside[module] - STDLIB)
        assert {t.split(".")[0] for t in imports[module]} <= {"domain"}, (module, imports[module])


def test_the_application_imports_only_the_standard_library_and_the_inner_layers(
    graph: tuple[dict[str, set[str]], dict[str, set[str]]],
) -> None:
    imports, outside = graph
    for module in (m for m in imports if m.split(".")[0] == "application"):
        assert outside[module] <= STDLIB, (module, outside[module] - STDLIB)
        assert {t.split(".")[0] for t in imports[module]} <= {"domain", "application"}, (
            module,
            imports[module],
        )


def test_adapters_never_import_bootstrap(graph: tuple[dict[str, set[str]], dict[str, set[str]]]) -> None:
    imports, _ = graph
    for module in (m for m in imports if m.split(".")[0] == "adapters"):
        assert "bootstrap" not in imports[module], module
