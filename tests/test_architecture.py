"""Package architecture: the modules of lens_safety import each other without cycles, and only the
command line reaches the top floors (report, cli).

Every import statement counts, those inside functions too: a function-level import is what lets
a cycle run (it only postpones the circular import to call time), so it is an edge like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lens_safety

PACKAGE = Path(lens_safety.__file__).parent
TOP_FLOORS = {"report": {"cli"}, "cli": {"__main__"}}  # module -> the only modules allowed to import it


def import_graph(package: Path, name: str = "lens_safety") -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (flat package; ``__init__`` is the package itself).

    Counts ``import name.x``, ``from name.x import y``, ``from name import x``, ``from .x import y``
    and ``from . import x``, wherever they are in the file.
    """
    modules = {p.stem for p in package.glob("*.py")}

    def target(dotted: str, names: list[str]) -> set[str]:
        parts = dotted.split(".") if dotted else []
        if parts:  # from .x import y / from name.x import y
            return {parts[0]} if parts[0] in modules else set()
        found = {n for n in names if n in modules}  # from . import x
        return found or {"__init__"}  # from . import __version__: the package itself

    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    deps |= target(node.module or "", [a.name for a in node.names])
                elif node.level == 0 and node.module and (node.module + ".").startswith(name + "."):
                    deps |= target(node.module[len(name) + 1:], [a.name for a in node.names])
                elif node.level > 1:
                    raise AssertionError(f"{path.name}: relative import beyond the package (level {node.level}).")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(name + "."):
                        deps |= target(alias.name[len(name) + 1:], [])
        deps.discard(path.stem)
        graph[path.stem] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], set[str]]]:
    """Per strongly connected component of more than one module: one cycle through it
    (``[a, b, ..., a]``) and the whole component (every module on some cycle with ``a``)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the package is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in components:  # a concrete cycle through the component's first module (breadth-first)
        start = min(comp)
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while path[-1] != start or len(path) == 1:
            path.append(prev[path[-1]])
        cycles.append((path[::-1], comp))
    return cycles


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component with more than one module."""
    return [cycle for cycle, _ in import_cycles(graph)]


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"models", "directions", "refusal", "judges", "lens", "tuned_lens"} <= set(graph)
    assert "directions" in graph["cli"] and "report" in graph["cli"]  # the parser sees function-level imports
    cycles = import_cycles(graph)
    assert not cycles, "Import cycles in lens_safety (move the shared code down a floor):\n" + "\n".join(
        f"{' -> '.join(cycle)}   (all modules on cycles here: {sorted(comp)})" for cycle, comp in cycles)


def test_only_the_command_line_imports_the_top_floors():
    graph = import_graph(PACKAGE)
    bad = {f"{m} imports {top}" for m, deps in graph.items() for top, allowed in TOP_FLOORS.items()
           if top in deps and m not in allowed}
    assert not bad, f"Only {TOP_FLOORS} may import the top floors: {sorted(bad)}"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "lens_safety"
    pkg.mkdir()
    for name, text in {"__init__.py": "", **files}.items():
        (pkg / name).write_text(text)
    return pkg


@pytest.mark.parametrize("files, expected", [
    # the old circle 2: lens -> tuned_lens only inside a function
    ({"lens.py": "def f():\n    from .tuned_lens import resolve_lens\n",
      "tuned_lens.py": "from .lens import lens_logits\n"}, ["lens", "tuned_lens", "lens"]),
    # absolute, `from . import x` and `import lens_safety.x` forms, three modules
    ({"a.py": "import lens_safety.b\n", "b.py": "from lens_safety import c\n",
      "c.py": "def g():\n    if True:\n        from . import a\n"}, ["a", "b", "c", "a"]),
    ({"a.py": "from lens_safety.b import x\n", "b.py": "class K:\n    def m(self):\n        import lens_safety.a\n"},
     ["a", "b", "a"]),
])
def test_the_checker_finds_cycles_hidden_in_functions(tmp_path, files, expected):
    graph = import_graph(_package(tmp_path, files))
    assert find_cycles(graph) == [expected]


def test_the_checker_ignores_names_and_other_packages(tmp_path):
    pkg = _package(tmp_path, {"a.py": "from . import __version__\nimport lens_safety_other.b\nfrom .b import y\n",
                              "b.py": "from lens_safety import __version__\nimport os\n"})
    graph = import_graph(pkg)
    assert graph["a"] == {"__init__", "b"} and graph["b"] == {"__init__"}
    assert find_cycles(graph) == []


def test_moved_names_stay_importable_from_their_old_modules():
    import lens_safety.directions as directions
    import lens_safety.lens as lens
    import lens_safety.models as models
    import lens_safety.readout as readout
    import lens_safety.translators as translators
    import lens_safety.tuned_lens as tuned_lens

    assert directions.hf_model_copy is models.hf_model_copy
    assert lens.lens_logits is readout.lens_logits
    for name in tuned_lens.__all__:
        assert hasattr(tuned_lens, name), name
    assert tuned_lens.TunedLens is translators.TunedLens and tuned_lens.resolve_lens is translators.resolve_lens
    assert lens_safety.TunedLens is translators.TunedLens and lens_safety.compare_lenses is tuned_lens.compare_lenses


@pytest.mark.parametrize("module", ["judges", "jailbreaks", "prompts", "report", "store", "validation", "stats"])
def test_light_modules_do_not_import_torch(module):
    """The judges, prompts and the report's module load without torch (as ``import lens_safety`` promises):
    a heavy import belongs inside the function that needs it."""
    import subprocess
    import sys

    code = f"import sys, lens_safety.{module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
