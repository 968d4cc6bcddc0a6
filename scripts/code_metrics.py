"""Print the code-health numbers that issue 11 reports before and after.

Counts, for ``src/backward_lens``: modules, lines, the ten longest functions (without their
docstrings), lines using ``dict[str, Any]``, docstring coverage of public modules, classes,
functions and methods (names not starting with ``_``, nested functions excluded), and import
cycles between the package's modules (every ``import`` statement counts, also those deferred
into a function body).

Usage: ``python scripts/code_metrics.py [SRC_DIR]``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` under the package root's parent."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Package modules imported anywhere in ``tree`` (resolving relative imports)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def main() -> None:
    """Print the metrics for the package directory given (default ``src/backward_lens``)."""
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src/backward_lens").resolve()
    files = sorted(root.rglob("*.py"))
    trees = {f: ast.parse(f.read_text(), str(f)) for f in files}
    names = {f: module_name(f, root) for f in files}
    known = set(names.values())
    lines = sum(len(f.read_text().splitlines()) for f in files)
    any_dict = sum(
        line.count("dict[str, Any]") > 0 for f in files for line in f.read_text().splitlines()
    )
    functions: list[tuple[int, str]] = []
    public = documented = 0
    for f, tree in trees.items():
        public += 1
        documented += ast.get_docstring(tree) is not None  # type: ignore[arg-type]
        stack: list[tuple[ast.AST, bool]] = [(tree, True)]
        while stack:
            node, top = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                        length = (child.end_lineno or child.lineno) - child.lineno + 1
                        first = child.body[0]
                        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                            length -= (first.end_lineno or first.lineno) - first.lineno + 1
                        functions.append((length, f"{names[f]}.{child.name}"))
                    if top and not child.name.startswith("_"):
                        public += 1
                        documented += ast.get_docstring(child) is not None
                    stack.append((child, top and isinstance(child, ast.ClassDef)))
    graph = {
        names[f]: imports_of(tree, names[f], f.name == "__init__.py", known)
        for f, tree in trees.items()
    }
    found = cycles(graph)
    functions.sort(reverse=True)
    print(f"modules: {len(files)}")
    print(f"lines: {lines}")
    print(f"lines with dict[str, Any]: {any_dict}")
    print(f"public docstring coverage: {documented}/{public} = {100 * documented / public:.1f}%")
    print(f"import cycles (strongly connected groups): {len(found)}")
    for group in found:
        print("  " + " <-> ".join(group))
    print("longest functions (lines, docstring excluded):")
    for length, name in functions[:10]:
        print(f"  {length:4d}  {name}")


if __name__ == "__main__":
    main()
