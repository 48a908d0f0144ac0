"""The notebooks as files: committed clean, thin, one parameters cell, each warning once, and a markdown cell that says
what every figure shows. (Running them is tests/integration/test_notebooks.py.)"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_CELL_LINES = 12  # code lines per cell, imports and comments not counted


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_with_parameters(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    for name in ("model", "device", "dtype"):
        assert f"{name} =" in _source(tagged[0])


def _logic(src: str) -> tuple[list[str], int]:
    """The functions, classes and lambdas a cell defines, and its code lines (imports and comments not counted)."""
    defined = [type(n).__name__ for n in ast.walk(ast.parse(src))
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
    lines = [ln for ln in src.splitlines()
             if ln.strip() and not ln.strip().startswith("#") and not ln.lstrip().startswith(("import ", "from "))]
    return defined, len(lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_thin(path):
    """Logic lives in maps_utils: no code cell defines a function, class or lambda, and none is longer than
    MAX_CELL_LINES code lines (the parameters cell excepted)."""
    for i, cell in enumerate(c for c in _cells(path) if c["cell_type"] == "code"):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        defined, n = _logic(_source(cell))
        assert not defined, f"{path.name}, code cell {i}: defines {defined}; move it into maps_utils"
        assert n <= MAX_CELL_LINES, f"{path.name}, code cell {i}: {n} code lines; move the logic into maps_utils"


def test_the_thinness_check_catches_logic():
    assert _logic("def f(x):\n    return x\n")[0] == ["FunctionDef"]
    assert _logic("y = sorted(xs, key=lambda v: -v)\n")[0] == ["Lambda"]
    assert _logic("import os\n# a comment\n\nprint(os.sep)\n") == ([], 1)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_warning_is_shown_once(path):
    """Logging goes through notebook_logging (each warning once per kernel), never a bare basicConfig."""
    code = "\n".join(_source(c) for c in _cells(path) if c["cell_type"] == "code")
    assert "notebook_logging(" in code and "basicConfig" not in code


def _figures_without_their_own_text(cells: list[dict]) -> list[int]:
    """Indexes of the cells that save a figure with no markdown cell since the previous figure."""
    lonely, text_since_figure = [], False
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown":
            text_since_figure = True
        elif "save_figure(" in _source(cell):
            if not text_since_figure:
                lonely.append(i)
            text_since_figure = False
    return lonely


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_figure_has_a_markdown_cell_saying_what_it_shows(path):
    assert not _figures_without_their_own_text(_cells(path)), path.name


def test_the_figure_check_catches_a_figure_without_text():
    md, fig = {"cell_type": "markdown", "source": ["what it shows"]}, {"cell_type": "code", "source": ["save_figure(f)"]}
    assert _figures_without_their_own_text([md, fig, fig, md, fig]) == [2]
