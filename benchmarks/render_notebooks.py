"""Execute every notebook on the real default model and save a copy with its outputs in
``notebooks/executed/`` (so a reader of the repository sees the figures without running anything).

    python benchmarks/render_notebooks.py            # all notebooks, LENS_SAFETY_N=10 prompts per set
    python benchmarks/render_notebooks.py 02_probes  # one

The notebooks themselves stay committed without outputs (CI executes them, tests/test_notebooks.py);
``tests/test_notebooks.py::test_executed_copies_match_their_notebooks`` fails when a copy's code differs
from its notebook (rerun this script). Outputs larger than 200 kB (the inlined circuitsvis bundle of an
interactive view) are replaced by a note: the views render when the notebook runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS, EXECUTED = ROOT / "notebooks", ROOT / "notebooks" / "executed"
MAX_OUTPUT = 200_000  # characters of one output's text/html


def _shrink(book) -> None:
    for cell in book.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            html = out.get("data", {}).get("text/html", "")
            if len(html) > MAX_OUTPUT:
                out["data"] = {"text/plain": "[an interactive circuitsvis view: it renders when the notebook runs "
                                             "(its offline JavaScript bundle is not kept in this copy)]"}
        cell.metadata.pop("execution", None)


def render(path: Path) -> Path:
    book = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:  # whatever a notebook writes stays out of the repository
        NotebookClient(book, timeout=1800, kernel_name="python3", resources={"metadata": {"path": work}}).execute()
    _shrink(book)
    EXECUTED.mkdir(exist_ok=True)
    out = EXECUTED / path.name
    nbformat.write(book, out)
    print(f"{path.name}: {time.perf_counter() - t0:.0f} s -> {out.relative_to(ROOT)}", flush=True)
    return out


def main(names: list[str]) -> None:
    os.environ.setdefault("LENS_SAFETY_N", "10")
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        if not names or path.stem in names:
            render(path)


if __name__ == "__main__":
    main(sys.argv[1:])
