"""The house rules of the package, checked from its source (no database)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "celery_pgnotify"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str) -> set[str]:
    """The package's modules ``path`` imports at module level (imports under
    ``if TYPE_CHECKING:`` count: a cycle in the types is one in the design;
    imports inside functions are deliberate and late)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    nodes: list[ast.stmt] = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If | ast.Try):
            nodes.extend(node.body + node.orelse)
            nodes.extend(h for handler in getattr(node, "handlers", []) for h in handler.body)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == package}


def _graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if "_pth" not in p.parts]
    modules = {_module_name(p): p for p in paths}
    return {
        name: {dep for dep in _imports(path, PACKAGE.name) if dep in modules and dep != name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_itself_in_a_cycle():
    graph = _graph()
    assert "celery_pgnotify.worker.manager" in graph  # the walk found the package
    assert _cycle(graph) is None


# A room a newcomer reads at a sitting: files and classes past these sizes
# are split by responsibility (ARCHITECTURE.md names the rooms).
MAX_FILE_LINES = 650
MAX_CLASS_LINES = 320


def _sizes() -> tuple[dict[str, int], dict[str, int]]:
    files, classes = {}, {}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        name = _module_name(path)
        files[name] = text.count("\n") + 1
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                classes[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    return files, classes


def test_no_file_or_class_outgrows_a_sitting():
    files, classes = _sizes()
    assert (
        files["celery_pgnotify.transport"] > 100
        and classes["celery_pgnotify.worker.pool.Pool"] > 100
    )
    assert {f: n for f, n in files.items() if n > MAX_FILE_LINES} == {}
    assert {c: n for c, n in classes.items() if n > MAX_CLASS_LINES} == {}
