"""adcore's modules import each other without cycles, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import adcore

ROOT = Path(adcore.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    """``adcore.x.y`` -> its file (a package is its ``__init__.py``)."""
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The adcore module ``name`` is, or is an attribute of (``adcore.export.VARIANTS`` -> ``adcore.export``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the adcore modules it imports anywhere in its file.

    An import of an enclosing package (``import adcore`` in ``adcore.scorer``) is left out: Python
    has initialised every enclosing package before the module runs, so it cannot close a cycle.
    """
    mods = _modules(root)
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            targets.update(t for t in (_owner(n, mods) for n in names) if t)
        graph[module] = {t for t in targets if t != module and not module.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_adcore_has_no_import_cycle():
    graph = import_graph()
    assert "adcore.engine" in graph["adcore.evaluate"] and "adcore.export" in graph["adcore.serving.artifacts"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found(tmp_path):
    """The walk sees imports inside functions and relative imports."""
    pkg = tmp_path / "adcore"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import adcore\nfrom adcore.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    assert find_cycle(import_graph(pkg)) == ["adcore.a", "adcore.sub.b", "adcore.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import sub\n")
    assert find_cycle(import_graph(pkg)) is None
