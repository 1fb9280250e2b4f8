"""The notebooks run top to bottom on the real default model (small subsets via LENS_SAFETY_N).

Executed notebooks must show every figure (a cell that draws has an image output), raise no
error, assert their own content (save/load round trip, effective pairs, a break layer), and
embed circuitsvis views offline. The asserts are found in the parsed code (a commented-out or
quoted assert does not count) and, when the notebooks run, each one records that it executed and
passed (:func:`instrument_asserts`): an assert in a branch that is never taken fails the test.
"""

from __future__ import annotations

import ast
import copy
import json
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


def assert_statements(book) -> list[str]:
    """The assert statements of the notebook's code cells, in order, as ``ast.unparse`` writes them."""
    return [ast.unparse(node) for c in book.cells if c.cell_type == "code"
            for node in ast.walk(ast.parse(c.source)) if isinstance(node, ast.Assert)]


def _normal(statement: str) -> str:
    return ast.unparse(ast.parse(statement))


_RAN = "_lens_safety_asserts_ran"
_RECORD = "LENS_SAFETY_ASSERTS_RAN="


def instrument_asserts(book):
    """A copy of ``book`` in which the i-th assert statement, once it has passed, records ``i``, and a
    last cell prints the record (read back by :func:`asserts_ran`). Returns ``(copy, n_asserts)``."""
    import nbformat

    book = copy.deepcopy(book)
    n = 0
    for cell in book.cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.split("\n")
        asserts = sorted((node for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Assert)),
                         key=lambda node: node.lineno)
        inserts = []
        for node in asserts:
            indent = lines[node.lineno - 1][:node.col_offset]
            if indent.strip() or lines[node.end_lineno - 1][node.end_col_offset:].split("#")[0].strip():
                raise AssertionError(f"put the assert on lines of its own: {lines[node.lineno - 1]!r}")
            inserts.append((node.end_lineno, f"{indent}globals().setdefault({_RAN!r}, []).append({n})"))
            n += 1
        for after, line in reversed(inserts):
            lines.insert(after, line)
        cell.source = "\n".join(lines)
        ast.parse(cell.source)
    book.cells.append(nbformat.v4.new_code_cell(
        f"print({_RECORD!r} + __import__('json').dumps(sorted(set(globals().get({_RAN!r}, [])))))"))
    return book, n


def asserts_ran(executed) -> set[int]:
    """The numbers of the asserts that ran and passed in a notebook made by :func:`instrument_asserts`."""
    text = "".join(o.get("text", "") for o in executed.cells[-1].outputs if o.output_type == "stream")
    found = re.search(re.escape(_RECORD) + r"(\[.*?\])", text)
    assert found, "the cell recording the asserts did not run"
    return set(json.loads(found.group(1)))


def test_asserts_are_checked_as_run_not_as_text(tmp_path):
    """A tiny notebook: an assert in a branch never taken is reported as not run; comments and strings
    are not asserts (the source-text check this replaces counted them)."""
    import nbformat
    from nbclient import NotebookClient

    v4 = nbformat.v4
    book = v4.new_notebook(cells=[
        v4.new_markdown_cell("assert False  # markdown is not code"),
        v4.new_code_cell("x = 1\nassert x == 1"),
        v4.new_code_cell("if x == 2:\n    assert x == 2, 'never checked'\n# assert x == 3\ns = 'assert x == 4'"),
        v4.new_code_cell("def f():\n    assert (\n        x == 1)\n    return x\nf()"),
    ])
    assert assert_statements(book) == ["assert x == 1", "assert x == 2, 'never checked'", "assert x == 1"]
    assert "assert x == 3" in "\n".join(c.source for c in book.cells)  # what a text search would have accepted
    marked, n = instrument_asserts(book)
    assert n == 3 and book.cells[1].source == "x = 1\nassert x == 1"  # the original is left alone
    NotebookClient(marked, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert asserts_ran(marked) == {0, 2}  # the assert under `if x == 2` never ran
    assert marked.cells[3].outputs[0]["data"]["text/plain"] == "1"  # the cell still shows its last value
    assert all(c.execution_count for c in marked.cells if c.cell_type == "code")
    with pytest.raises(AssertionError, match="lines of its own"):
        instrument_asserts(v4.new_notebook(cells=[v4.new_code_cell("x = 1; assert x")]))


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert [p.stem for p in NOTEBOOKS][:4] == ["01_quickstart", "02_probes", "03_logit_lens", "04_patching"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name
        assert "import lens_safety as ls" in code[0].source


def test_executed_copies_match_their_notebooks():
    """notebooks/executed/ holds each notebook run on the real model (benchmarks/render_notebooks.py), for
    readers who do not run it: the same code cells, every one executed without error, every figure shown."""
    import nbformat

    executed = Path(__file__).parent.parent / "notebooks" / "executed"
    for path in NOTEBOOKS:
        copy = executed / path.name
        assert copy.is_file(), f"{copy} is missing: run python benchmarks/render_notebooks.py {path.stem}"
        book, ran = nbformat.read(path, as_version=4), nbformat.read(copy, as_version=4)
        code = [c.source for c in book.cells if c.cell_type == "code"]
        assert [c.source for c in ran.cells if c.cell_type == "code"] == code, (
            f"{copy.name} is stale: run python benchmarks/render_notebooks.py {path.stem}")
        cells = [c for c in ran.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in cells), copy.name
        assert not [o for c in cells for o in c.outputs if o.output_type == "error"], copy.name
        missing = [c.source.splitlines()[-1] for c in plotting_cells(ran) if not has_image(c)]
        assert not missing, f"{copy.name}: cells without a figure: {missing}"


def test_notebooks_draw_and_assert():
    """Every notebook draws figures; 02, 04 and 05 check their own results with assert."""
    import nbformat

    books = {p.stem: nbformat.read(p, as_version=4) for p in NOTEBOOKS}
    for stem in ("01_quickstart", "02_probes", "03_logit_lens", "04_patching", "05_refusal_direction",
                 "06_harm_vs_refusal"):
        assert plotting_cells(books[stem]), stem
    found = {stem: assert_statements(b) for stem, b in books.items()}
    assert _normal("assert (again.predict(jb) == svm.predict(jb)).all()") in found["02_probes"]
    assert {s.split(",")[0] for s in found["04_patching"]} >= {"assert len(pairs) > 0", "assert layer is not None"}
    assert any(s.startswith(_normal("assert gap < 1e-3")) for s in found["05_refusal_direction"])
    assert any(s.startswith("assert rows.loc['+refusal', 'refusal_delta'] > 0") for s in found["06_harm_vs_refusal"])
    for stem, b in books.items():  # the real-model run can record each of them (test_notebook_executes)
        marked, n = instrument_asserts(b)
        assert n == len(found[stem]) and len(marked.cells) == len(b.cells) + 1, stem


@pytest.mark.real
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LENS_SAFETY_N", "10")
    book, n_asserts = instrument_asserts(nbformat.read(path, as_version=4))
    NotebookClient(book, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # every assert statement ran and passed (an assert in a branch never taken would be missing)
    assert asserts_ran(book) == set(range(n_asserts)), f"asserts that did not run: {n_asserts} expected"
    assert all(c.execution_count for c in book.cells if c.cell_type == "code")
    # every figure is shown (pyplot-made figures display even after a trailing ';')
    missing = [c.source.splitlines()[-1] for c in plotting_cells(book) if not has_image(c)]
    assert not missing, f"cells without a figure: {missing}"
    html = [o for o in outputs if o.output_type in ("display_data", "execute_result")
            and "text/html" in o.get("data", {})]
    if path.stem in ("01_quickstart", "03_logit_lens"):
        # the circuitsvis view is embedded offline: the bundle is inline, nothing comes from a URL
        assert any("CircuitsVis" in o["data"]["text/html"] for o in html)
        assert not any("unpkg.com" in o["data"]["text/html"] for o in html)
