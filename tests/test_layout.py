"""The layout rules a reader relies on: no import cycle between the project's modules, and launch/ is a package
run with `python -m`, with no sys.path edits anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGES = ("data", "models", "spine", "launch")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [ROOT / "train.py"] + [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(path: Path, known: set[str]) -> set[str]:
    """First-party modules `path` imports at module level or inside functions (a lazy import still couples)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycle():
    sources = _sources()
    graph = {name: _imports(path, set(sources)) - {name} for name, path in sources.items()}
    # A package's __init__ importing its own submodules is how a package is built, not a cycle of concerns.
    graph = {name: {d for d in deps if not d.startswith(name + ".")} for name, deps in graph.items()}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert "train" in graph and graph["launch.runner"] >= {"spine.logger"}


def test_nothing_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in [ROOT / "train.py", *ROOT.glob("*/*.py")]
                 if "sys.path" in p.read_text() and p.name != "test_layout.py"]
    assert not offenders, f"edit sys.path: {offenders} (run launchers as python -m launch.NAME)"
