"""Shape of the flowmc package: modules per folder, the longest units, the import graph.

Static (AST only; nothing is imported), so it runs on any checkout::

    python scripts/code_stats.py                # this checkout
    python scripts/code_stats.py --root OTHER   # another checkout (e.g. a worktree of main)
    python scripts/code_stats.py --top 20 --json stats.json

It prints the number of modules per folder of ``flowmc/``, the longest functions and methods
(lines from ``def`` to the last line of the body), and the cycles of the import graph. The graph
counts every import of a flowmc module: module-level and inside functions, relative or absolute,
except those under ``if TYPE_CHECKING:`` (they never run). ``from flowmc.x import y`` is an edge to
the module ``flowmc.x.y`` if that is a module, else to ``flowmc.x``.

:func:`import_graph` is also what ``tests/test_layering.py`` checks the layering with.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Import:
    """One import of a package module by another.

    Attributes:
        source: the importing module (dotted name).
        target: the imported module (dotted name; a package stands for its ``__init__``).
        names: the names taken from ``target`` (``from target import a, b``), else ``()``.
        line: line number in the importing module.
        module_level: whether the import runs at import time (not inside a function).
    """

    source: str
    target: str
    names: tuple[str, ...]
    line: int
    module_level: bool


@dataclass(frozen=True)
class AttributeUse:
    """``alias.name`` where ``alias`` is bound to a package module by an import."""

    source: str
    target: str
    name: str
    line: int


def modules(package_dir: Path) -> dict[str, Path]:
    """Every module of the package at ``package_dir``: dotted name -> file."""
    out = {}
    top = package_dir.name
    for p in sorted(package_dir.rglob("*.py")):
        parts = [top, *p.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(body: list[ast.stmt], in_function: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node of ``body`` with whether it lies inside a function; skips TYPE_CHECKING."""
    for node in body:
        if _is_type_checking(node):
            if node.orelse:
                yield from _walk(node.orelse, in_function)
            continue
        yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for field in ("body", "orelse", "finalbody", "handlers"):
            sub = getattr(node, field, None)
            if isinstance(sub, list):
                yield from _walk([s for s in sub if isinstance(s, ast.AST)], inner)
        if isinstance(node, ast.Match):  # pragma: no cover - not used by flowmc
            for case in node.cases:
                yield from _walk(case.body, inner)
        # expressions (for attribute uses): walk them without descending into statements
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.stmt) and not isinstance(child, ast.excepthandler):
                for sub_node in ast.walk(child):
                    yield sub_node, inner


def import_graph(package_dir: Path) -> tuple[dict[str, Path], list[Import], list[AttributeUse]]:
    """The modules of a package, their imports of each other, and ``module.attr`` uses.

    Returns:
        ``(modules, imports, attribute_uses)``.
    """
    mods = modules(package_dir)
    top = package_dir.name

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    imports: list[Import] = []
    uses: list[AttributeUse] = []
    for m, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = m if path.name == "__init__.py" else m.rpartition(".")[0]
        bound: dict[str, str] = {}  # local name -> package module it is bound to
        seen_attr: set[tuple[str, str, int]] = set()
        for node, in_function in _walk(tree.body, False):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == top or a.name.startswith(top + "."):
                        t = resolve(a.name)
                        if t is not None and t != m:
                            imports.append(Import(m, t, (), node.lineno, not in_function))
                        if a.asname and t == a.name:
                            bound[a.asname] = t
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if not (base == top or base.startswith(top + ".")):
                    continue
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in mods:  # a submodule
                        imports.append(Import(m, full, (), node.lineno, not in_function))
                        bound[a.asname or a.name] = full
                    else:
                        t = resolve(base)
                        if t is not None and t != m:
                            imports.append(Import(m, t, (a.name,), node.lineno, not in_function))
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
            ):
                key = (bound[node.value.id], node.attr, node.lineno)
                if key not in seen_attr:
                    seen_attr.add(key)
                    uses.append(AttributeUse(m, bound[node.value.id], node.attr, node.lineno))
    return mods, imports, uses


def edges(imports: list[Import]) -> dict[str, set[str]]:
    """The import graph as adjacency sets (self-imports dropped)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if i.source != i.target:
            graph.setdefault(i.source, set()).add(i.target)
    return graph


def strongly_connected(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node (the import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        for v in sorted(nodes):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(old)
    return sorted(out)


def elementary_cycles(graph: dict[str, set[str]], limit: int = 10_000) -> list[list[str]]:
    """Simple cycles (each once, starting at its smallest module), up to ``limit`` of them."""
    order = sorted(set(graph) | {w for ws in graph.values() for w in ws})
    found: list[list[str]] = []
    for i, start in enumerate(order):
        allowed = set(order[i:])
        todo = [(start, [start])]
        while todo and len(found) < limit:
            v, path = todo.pop()
            for w in sorted(graph.get(v, ())):
                if w == start:
                    found.append([*path, start])
                elif w in allowed and w not in path:
                    todo.append((w, [*path, w]))
    return found


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
        first.value.value, str
    ):
        return first.end_lineno - first.lineno + 1
    return 0


def units(package_dir: Path) -> list[tuple[int, str, int, int]]:
    """Every function and method: ``(lines, "module:Qual.name", first line, docstring lines)``,
    longest first."""
    out = []
    for m, path in modules(package_dir).items():
        tree = ast.parse(path.read_text(), str(path))

        def visit(body: list[ast.stmt], prefix: str, m: str = m) -> None:
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{node.name}"
                    out.append((node.end_lineno - node.lineno + 1, f"{m}:{name}", node.lineno,
                                _docstring_lines(node)))  # fmt: skip
                    visit(node.body, f"{name}.")
                elif isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")
                else:
                    for field in ("body", "orelse", "finalbody", "handlers"):
                        sub = getattr(node, field, None)
                        if isinstance(sub, list):
                            visit([s for s in sub if isinstance(s, ast.stmt)], prefix)

        visit(tree.body, "")
    return sorted(out, key=lambda u: (-u[0], u[1]))


def folders(package_dir: Path) -> dict[str, int]:
    """Number of modules (``.py`` files, ``__init__`` included) per folder of the package."""
    c = Counter(str(p.parent.relative_to(package_dir.parent)) for p in package_dir.rglob("*.py"))
    return dict(sorted(c.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout (default: this one)")
    parser.add_argument("--package", default="flowmc")
    parser.add_argument("--top", type=int, default=10, help="longest units to list")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    pkg = args.root / args.package
    per_folder = folders(pkg)
    mods, imports, _ = import_graph(pkg)
    graph = edges(imports)
    sccs = strongly_connected(graph, list(mods))
    cycles = elementary_cycles(graph)
    longest = units(pkg)[: args.top]
    print(f"modules per folder ({sum(per_folder.values())} in all):")
    for folder, n in per_folder.items():
        print(f"  {folder + '/':24s} {n:3d}")
    print(f"longest units (lines, of which docstring; of {len(units(pkg))} functions and "
          "methods):")  # fmt: skip
    for n, name, line, doc in longest:
        print(f"  {n:4d} {doc:4d}  {name} (line {line})")
    n_edges = sum(map(len, graph.values()))
    print(f"import graph: {len(mods)} modules, {n_edges} edges; {len(sccs)} cyclic components, "
          f"{len(cycles)} elementary cycles")
    for comp in sccs:
        print("  component:", ", ".join(comp))
    for cyc in cycles[:20]:
        print("  cycle:", " -> ".join(cyc))
    if args.json:
        args.json.write_text(json.dumps({
            "modules_per_folder": per_folder,
            "longest_units": [{"lines": n, "docstring": d, "unit": u, "line": ln}
                              for n, u, ln, d in longest],
            "modules": len(mods), "edges": n_edges, "cyclic_components": sccs,
            "cycles": cycles,
        }, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
