"""Build the teaching notebooks from their sources: notebooks/src/NN_name.py -> notebooks/NN_name.ipynb.

A source is a Python file in the "percent" format (the one jupytext and VS Code read)::

    # %% [markdown]
    # # A title
    # Some prose, each line prefixed by "# ".

    # %%
    x = 1 + 1          # a code cell

``python notebooks/build.py`` rebuilds every notebook; ``python notebooks/build.py 03 07`` only the ones
whose names start with those prefixes. Each notebook is executed top to bottom in a fresh kernel
(nbclient, working directory notebooks/), then cleaned so that the committed file is reproducible and
renders on GitHub: outputs kept (plots as PNG), no widget state, no execution timestamps, no kernel
metadata beyond the language, and no absolute machine path in any output (the build fails if one
appears, rather than committing it).

Run this whenever the library changes something a notebook shows; tests/test_notebooks.py checks that
every committed notebook's code matches its source and still executes.
"""

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
TIMEOUT = 600                      # seconds per cell
KERNEL = "python3"

# Strings that must never appear in a committed output: absolute paths of this or any machine.
FORBIDDEN_IN_OUTPUTS = (str(HERE.parent), "/home/", "/root/", "/tmp/", "/work/", "/Users/", "site-packages")


def parse_source(text: str) -> list:
    """Split a percent-format source into nbformat cells (markdown lines lose their leading '# ')."""
    cells, kind, lines = [], None, []

    def flush():
        body = "\n".join(lines).strip("\n")
        if kind is not None and body.strip():
            if kind == "markdown":
                md = "\n".join(re.sub(r"^# ?", "", line) for line in body.split("\n"))
                cells.append(nbformat.v4.new_markdown_cell(md))
            else:
                cells.append(nbformat.v4.new_code_cell(body))

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return cells


def new_notebook(cells: list):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata = {"kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return nb


def notebook_from_source(path: Path):
    return new_notebook(parse_source(path.read_text()))


def execute(nb, timeout: int = TIMEOUT):
    """Run every cell in a fresh kernel with notebooks/ as the working directory (raises on error)."""
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(HERE)}})
    client.execute()
    return nb


def clean(nb):
    """Drop what differs between machines and runs: cell metadata (timings), widget state, ids."""
    nb.metadata = {"kernelspec": {"name": KERNEL, "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    count = 0
    for i, cell in enumerate(nb.cells):
        cell.metadata = {}
        cell.id = f"cell-{i:02d}"
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count
        kept = []
        for out in cell.get("outputs", []):
            if "metadata" in out:
                out.metadata = {}
            data = out.get("data")
            if data is not None:
                data.pop("application/vnd.jupyter.widget-view+json", None)
                if "execution_count" in out:
                    out.execution_count = count
            kept.append(out)
        cell.outputs = kept
    return nb


def check_outputs(nb, name: str) -> None:
    """Fail if any output holds an absolute path or widget state."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            text = str(out)
            for bad in FORBIDDEN_IN_OUTPUTS:
                if bad in text:
                    raise SystemExit(f"{name}: cell {i} output contains {bad!r}; print relative paths instead")
            if "application/vnd.jupyter.widget" in text:
                raise SystemExit(f"{name}: cell {i} output contains widget state")


def build(path: Path) -> float:
    t0 = time.perf_counter()
    nb = execute(notebook_from_source(path))
    clean(nb)
    check_outputs(nb, path.stem)
    nbformat.validate(nb)
    nbformat.write(nb, HERE / (path.stem + ".ipynb"))
    return time.perf_counter() - t0


def sources(prefixes=()) -> list:
    paths = sorted(SRC.glob("[0-9][0-9]_*.py"))
    if prefixes:
        paths = [p for p in paths if any(p.stem.startswith(x) for x in prefixes)]
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prefixes", nargs="*", help="build only notebooks whose names start with these")
    args = parser.parse_args(argv)
    paths = sources(args.prefixes)
    if not paths:
        raise SystemExit(f"no notebook source matches {args.prefixes}")
    for path in paths:
        seconds = build(path)
        print(f"built {path.stem}.ipynb in {seconds:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
