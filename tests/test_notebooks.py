"""The notebooks run top to bottom on the real default model (small subsets via LENS_SAFETY_N)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_probes", "03_logit_lens", "04_patching"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name
        assert "import lens_safety as ls" in code[0].source


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
    html = [o for o in outputs if o.output_type in ("display_data", "execute_result")
            and "text/html" in o.get("data", {})]
    if path.stem in ("01_quickstart", "03_logit_lens"):
        # the circuitsvis view is embedded offline: the bundle is inline, nothing comes from a URL
        assert any("CircuitsVis" in o["data"]["text/html"] for o in html)
        assert not any("unpkg.com" in o["data"]["text/html"] for o in html)
