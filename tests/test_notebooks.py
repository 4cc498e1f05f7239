"""The notebooks: committed without outputs, and executing without errors at small scale.

Each notebook runs in a fresh ``python3`` kernel (the one of the running interpreter's
environment) with ``TWOPHASE_NOTEBOOK_SMALL=1``; measured at well under a minute each on two CPU
cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TIMEOUT_PER_CELL = 300  # seconds


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    expected = {"01_quickstart.ipynb", "02_paper_figures.ipynb", "03_optax_pipelines.ipynb"}
    expected.add("04_physics_informed.ipynb")
    assert expected <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.get("outputs", []) == [], f"{path.name} cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{path.name} cell {i} has a count"


# The physics-informed notebook (newest) in the fast suite; the others marked slow.
EXECUTED = [
    pytest.param(p, id=p.stem, marks=() if p.stem.startswith("04") else pytest.mark.slow)
    for p in NOTEBOOKS
]


@pytest.mark.parametrize("path", EXECUTED)
def test_notebook_executes(path, monkeypatch):
    # The kernel inherits this process's environment: the small scale, and no GPU preallocation.
    monkeypatch.setenv("TWOPHASE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=TIMEOUT_PER_CELL,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    # Raises CellExecutionError (naming the cell and its traceback) on any cell error.
    client.execute()
    assert os.environ["TWOPHASE_NOTEBOOK_SMALL"] == "1"
