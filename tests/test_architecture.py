"""The shape of the code, checked from its syntax trees so that it stays as docs/development.md says:

* the shared core ``edgeward`` imports no role package; the orchestrator and the node agent never
  import each other;
* no import cycle between our modules (every import counts: lazy ones inside functions and those
  under ``TYPE_CHECKING`` too);
* no function in ``orchestrator/`` is longer than 80 lines (Alembic migrations aside);
* no two test modules share a file name (the suite imports them by basename, ``rootdir``-relative
  without packages: a second ``test_x.py`` stops the whole collection).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = "edgeward"
ROLES = ("orchestrator", "node_agent", "attestation", "accelerators", "usecases")
MAX_FUNCTION_LINES = 80
MIGRATIONS = "orchestrator/sql/migrations/"


def _sources() -> Iterator[tuple[str, Path, bool]]:
    """(module name, path, is a package) of every module we wrote (generated protobuf modules aside)."""
    for top in (CORE, *ROLES):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            package = parts[-1] == "__init__"
            yield ".".join(parts[:-1] if package else parts), path, package


MODULES = {name: (path, package) for name, path, package in _sources()}


def _owner(name: str) -> str | None:
    """The module of ours that an imported name lives in (``a.b.C`` -> ``a.b``), if any."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    path, package = MODULES[module]
    here = module if package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in map(_owner, targets) if t is not None and t != module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _top(module: str) -> str:
    return module.partition(".")[0]


def test_the_shared_core_imports_no_role() -> None:
    wrong = {m: sorted(d for d in deps if _top(d) != CORE) for m, deps in GRAPH.items() if _top(m) == CORE}
    assert {m: d for m, d in wrong.items() if d} == {}


@pytest.mark.parametrize(("role", "other"), [("orchestrator", "node_agent"), ("node_agent", "orchestrator")])
def test_the_orchestrator_and_the_agent_never_import_each_other(role: str, other: str) -> None:
    wrong = {m: sorted(d for d in deps if _top(d) == other) for m, deps in GRAPH.items() if _top(m) == role}
    assert {m: d for m, d in wrong.items() if d} == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph[step]))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def _functions(top: str) -> Iterator[tuple[str, int]]:
    for module, (path, _) in MODULES.items():
        if _top(module) != top:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def test_no_function_in_the_orchestrator_is_longer_than_80_lines() -> None:
    long = {
        where: lines
        for where, lines in _functions("orchestrator")
        # A migration is a frozen record of a schema (it is never edited), not logic.
        if lines > MAX_FUNCTION_LINES and not where.startswith(MIGRATIONS)
    }
    assert long == {}


def test_no_two_test_modules_share_a_file_name() -> None:
    seen: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name not in ("__init__.py", "conftest.py"):
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
