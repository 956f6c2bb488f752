"""The package's shape: layers in folders, a handful of modules at the root, no import cycles.

Every import statement counts, function-level and `TYPE_CHECKING` ones included: a lazy import only
hides a cycle from the interpreter, not from a reader.
"""

from __future__ import annotations

from pathlib import Path

from _imports import PKG, cycles, import_graph, imports

ROOT_MODULES = {"__init__", "config", "errors", "geometry", "runtime"}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_sees_function_level_imports(tmp_path):
    """The check above can fail: a lazy import inside a function closes a cycle."""
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert cycles(graph) == []
    pkg = tmp_path / "xsvggt_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from xsvggt_jax.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    modules = {"xsvggt_jax": pkg / "__init__.py", "xsvggt_jax.a": pkg / "a.py", "xsvggt_jax.b": pkg / "b.py"}
    graph = {m: imports(m, p, modules) for m, p in modules.items()}
    assert cycles(graph) == [["xsvggt_jax.a", "xsvggt_jax.b"]]


def test_package_root_holds_only_the_shared_modules():
    root = {p.stem for p in PKG.glob("*.py")}
    assert root <= ROOT_MODULES, sorted(root - ROOT_MODULES)
    folders = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    assert {"attention", "nn", "cache", "stream", "weights", "io", "app"} <= folders


def test_heaviest_first_names_test_files_that_exist():
    """conftest's scheduling order names real files, each once (a renamed file would silently drop out
    of the longest-first order)."""
    from conftest import HEAVIEST_FIRST
    tests = Path(__file__).resolve().parent
    assert len(set(HEAVIEST_FIRST)) == len(HEAVIEST_FIRST)
    assert [name for name in HEAVIEST_FIRST if not (tests / name).is_file()] == []
