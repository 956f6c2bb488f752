"""The package's shape: layers in folders, a handful of modules at the root, no import cycles.

Every import statement counts, function-level and `TYPE_CHECKING` ones included: a lazy import only
hides a cycle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "xsvggt_jax"
ROOT_MODULES = {"__init__", "config", "errors", "geometry", "runtime"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that `name` imports anywhere in its file (a package's own parent excluded)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert _cycles(graph) == []


def test_cycle_finder_sees_function_level_imports(tmp_path):
    """The check above can fail: a lazy import inside a function closes a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert _cycles(graph) == []
    pkg = tmp_path / "xsvggt_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from xsvggt_jax.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    modules = {"xsvggt_jax": pkg / "__init__.py", "xsvggt_jax.a": pkg / "a.py", "xsvggt_jax.b": pkg / "b.py"}
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert _cycles(graph) == [["xsvggt_jax.a", "xsvggt_jax.b"]]


def test_package_root_holds_only_the_shared_modules():
    root = {p.stem for p in PKG.glob("*.py")}
    assert root <= ROOT_MODULES, sorted(root - ROOT_MODULES)
    folders = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert {"attention", "nn", "cache", "stream", "weights", "io", "app"} <= folders
