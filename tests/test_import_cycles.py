"""The package's imports form no cycle at module level, and the two cycles issue 11 removed
(`pipelines.recipe` <-> `flows.schedule`, `pipelines.output` <-> `pipelines.pipeline`) stay
gone: those modules do not import each other's side at all, not even lazily or for types."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gristmill"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The package's modules an import statement loads (a submodule, not its package)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
        whole = {node.module} if node.module in modules and len(subs) < len(node.names) else set()
        return subs | whole
    return set()


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_level(body: list[ast.stmt], modules: dict[str, Path]) -> set[str]:
    """Imports run when the module loads: not in functions, not under TYPE_CHECKING."""
    out: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.If) and is_type_checking(node):
            out |= module_level(node.orelse, modules)
            continue
        out |= imported(node, modules)
        for name in ("body", "orelse", "finalbody"):
            out |= module_level(getattr(node, name, []), modules)
        for handler in getattr(node, "handlers", []):
            out |= module_level(handler.body, modules)
    return out


def graphs(package: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Per module: what it imports at module level, and what it imports anywhere."""
    modules = module_files(package)
    top, anywhere = {}, {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top[name] = module_level(tree.body, modules) - {name}
        anywhere[name] = set().union(*(imported(n, modules) for n in ast.walk(tree))) - {name}
    return top, anywhere


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_module_level() -> None:
    top, _ = graphs(PACKAGE)
    assert len(top) > 50  # the walk found the package
    assert cycles(top) == []


def test_the_two_removed_cycles_have_no_back_edge_at_all() -> None:
    top, anywhere = graphs(PACKAGE)
    # the forward edges exist (the schedule reads recipe files; the pipeline writes outputs)
    assert "gristmill.pipelines.recipe" in top["gristmill.flows.schedule"]
    assert "gristmill.pipelines.output" in top["gristmill.pipelines.pipeline"]
    # and nothing leads back, not in a function, not for type checking
    assert "gristmill.flows.schedule" not in anywhere["gristmill.pipelines.recipe"]
    assert "gristmill.pipelines.pipeline" not in anywhere["gristmill.pipelines.output"]
