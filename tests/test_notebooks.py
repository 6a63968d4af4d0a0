"""The teaching notebooks (notebooks/NN_*.ipynb): each runs from a clean kernel, matches its source, and is
committed clean.

- test_notebook_executes: every notebook is executed top to bottom in a fresh kernel with nbclient
  (working directory notebooks/). Each notebook ends with assertions against refbitnet, so a library
  change that breaks what a notebook teaches fails here. Notebooks that take more than about a minute
  on 2 cores are marked slow.
- test_notebook_matches_source: the committed cells are exactly those notebooks/build.py makes from
  notebooks/src/NN_*.py (so the .ipynb is never edited by hand and drifts from its source).
- test_notebook_is_clean: committed with outputs (so GitHub shows the plots), without widget state,
  execution metadata or absolute machine paths.
"""

import copy
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import build  # noqa: E402  (notebooks/build.py)

CELL_TIMEOUT = 300           # seconds per cell; whole notebooks take 5-65 s on a loaded 2-core machine
SLOW = {"06_generation_kv_cache"}   # > ~60 s on a loaded 2-core machine (loads transformers + torch)

NAMES = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _params():
    return [pytest.param(n, marks=pytest.mark.slow, id=n) if n in SLOW else pytest.param(n, id=n) for n in NAMES]


def _read(name):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_every_source_has_a_notebook():
    sources = sorted(p.stem for p in build.sources())
    assert sources == NAMES, "run `python notebooks/build.py` to (re)generate the notebooks from notebooks/src"


@pytest.mark.parametrize("name", _params())
def test_notebook_executes(name):
    nb = copy.deepcopy(_read(name))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    t0 = time.perf_counter()
    build.execute(nb, timeout=CELL_TIMEOUT)              # raises CellExecutionError naming the cell
    print(f"{name}: executed in {time.perf_counter() - t0:.1f} s")
    last_code = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert "assert" in last_code.source, f"{name}: the last code cell should check the library"
    assert any("all checks passed" in o.get("text", "") for o in last_code.outputs)


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in NAMES])
def test_notebook_matches_source(name):
    committed = [(c.cell_type, c.source) for c in _read(name).cells]
    expected = [(c.cell_type, c.source) for c in build.notebook_from_source(build.SRC / f"{name}.py").cells]
    assert committed == expected, (f"{name}.ipynb differs from notebooks/src/{name}.py: run "
                                   f"`python notebooks/build.py {name[:2]}`")


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in NAMES])
def test_notebook_is_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert "widgets" not in nb.metadata
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs for c in code if "print(" in c.source or "plt.show()" in c.source), \
        f"{name}: committed without outputs; build it with notebooks/build.py"
    for i, cell in enumerate(nb.cells):
        assert cell.metadata == {}, f"{name}: cell {i} carries metadata {dict(cell.metadata)}"
        for out in cell.get("outputs", []):
            text = str(out)
            assert "application/vnd.jupyter.widget" not in text, f"{name}: cell {i} holds widget state"
            assert out.get("output_type") != "error", f"{name}: cell {i} was committed with an error"
            for bad in build.FORBIDDEN_IN_OUTPUTS:
                assert bad not in text, f"{name}: cell {i} output contains the machine path {bad!r}"
