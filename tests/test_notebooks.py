"""The notebooks in notebooks/: committed without outputs, and each executes top to bottom.

Each notebook runs in a fresh Jupyter kernel (nbclient + ipykernel, this interpreter) whose working
directory is a temporary folder and whose `xsvggt_jax` is this checkout's (PYTHONPATH), so a cell that
raises fails the test with its traceback. The kernels get `conftest.CHILD_XLA_FLAGS` (LLVM's cheaper
pipeline: about twice as fast to compile the notebooks' train and stream steps on a CPU; they check
nothing against upstream's numbers).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import child_xla_flags

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 1200  # a train step's first call compiles for minutes on a loaded 2-core CPU


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["compression_study.ipynb", "tour.ipynb", "training.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {cell.id} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["XLA_FLAGS"] = child_xla_flags()
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
