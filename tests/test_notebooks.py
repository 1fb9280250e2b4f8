"""The notebooks run top to bottom on the real default model (small subsets via LENS_SAFETY_N).

Executed notebooks must show every figure (a cell that draws has an image output), raise no
error, assert their own content (save/load round trip, effective pairs, a break layer), and
embed circuitsvis views offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
#: a code cell that draws a matplotlib figure
PLOTTING = re.compile(r"\.plot\(|viz\.\w*(figure|heatmap)\w*\(")


def plotting_cells(book) -> list:
    return [c for c in book.cells if c.cell_type == "code" and PLOTTING.search(c.source)]


def has_image(cell) -> bool:
    return any(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for o in cell.outputs)


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert [p.stem for p in NOTEBOOKS][:4] == ["01_quickstart", "02_probes", "03_logit_lens", "04_patching"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name
        assert "import lens_safety as ls" in code[0].source


def test_notebooks_draw_and_assert():
    """Every notebook draws figures; 02, 04 and 05 check their own results with assert."""
    import nbformat

    books = {p.stem: nbformat.read(p, as_version=4) for p in NOTEBOOKS}
    for stem in ("01_quickstart", "02_probes", "03_logit_lens", "04_patching", "05_refusal_direction"):
        assert plotting_cells(books[stem]), stem
    src = {stem: "\n".join(c.source for c in b.cells if c.cell_type == "code") for stem, b in books.items()}
    assert "assert (again.predict(jb) == svm.predict(jb)).all()" in src["02_probes"]
    assert "assert len(pairs) > 0" in src["04_patching"] and "assert layer is not None" in src["04_patching"]
    assert "assert gap < 1e-3" in src["05_refusal_direction"]


@pytest.mark.real
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LENS_SAFETY_N", "10")
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # every figure is shown (pyplot-made figures display even after a trailing ';')
    missing = [c.source.splitlines()[-1] for c in plotting_cells(book) if not has_image(c)]
    assert not missing, f"cells without a figure: {missing}"
    html = [o for o in outputs if o.output_type in ("display_data", "execute_result")
            and "text/html" in o.get("data", {})]
    if path.stem in ("01_quickstart", "03_logit_lens"):
        # the circuitsvis view is embedded offline: the bundle is inline, nothing comes from a URL
        assert any("CircuitsVis" in o["data"]["text/html"] for o in html)
        assert not any("unpkg.com" in o["data"]["text/html"] for o in html)
