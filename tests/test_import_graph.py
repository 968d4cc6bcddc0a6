"""Dependencies one way: no import cycles in the package, and editors never import the table.

Every ``import`` statement counts, also one deferred into a function body or under
``TYPE_CHECKING``: a deferred import hides a cycle, it does not remove it. ``from pkg import x``
counts as importing ``pkg`` (its ``__init__`` runs first) and ``pkg.x`` when that is a module.
The rules are those of ``scripts/code_metrics.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "backward_lens"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """Module -> package modules it imports (relative imports resolved)."""
    files = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in files:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    found.add(candidate)
        graph[name] = found
    return graph


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one (depth-first search)."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_graph_sees_deferred_imports() -> None:
    """The check would catch a cycle hidden in a function body (a test that can fail)."""
    graph = _graph()
    assert "backward_lens.editing.table" in graph["backward_lens.editing"]
    assert "backward_lens.lens" in graph["backward_lens.models"]
    graph["backward_lens.lens"] = {*graph["backward_lens.lens"], "backward_lens.models"}
    assert _cycle_from(graph, "backward_lens.lens") is not None


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = [c for c in (_cycle_from(graph, m) for m in sorted(graph)) if c]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_editor_modules_do_not_import_the_table() -> None:
    """The table imports the editors; no editor imports the table.

    An editor importing the table (or the package, whose ``__init__`` imports it) would make a
    cycle and a second way to find editors.
    """
    graph = _graph()
    editors = [m for m in graph if m.startswith("backward_lens.editing.")]
    assert "backward_lens.editing.table" in editors
    offenders = [
        m
        for m in editors
        if m != "backward_lens.editing.table"
        and graph[m] & {"backward_lens.editing.table", "backward_lens.editing"}
    ]
    assert not offenders, offenders
