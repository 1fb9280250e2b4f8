"""Package architecture: the modules of lens_safety import each other without cycles, one way down the
floors (core < inputs < model < capture < behaviour < analyses < pipeline < cli), and use no private
(``_name``) name of another floor's module.

Every import statement counts, those inside functions too: a function-level import is what lets
a cycle run (it only postpones the circular import to call time), so it is an edge like any other.

The package's own modules are imported at module top; only a light module (one that loads without torch,
``LIGHT``) keeps an import of a module that loads torch inside the function that needs it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lens_safety

PACKAGE = Path(lens_safety.__file__).parent
#: The floors, bottom up. A module may import its own floor (without cycles) and the floors below, never above.
FLOORS = ("__init__", "core", "inputs", "model", "capture", "behaviour", "analyses", "pipeline", "cli", "__main__")


def floor(module: str) -> int:
    """The floor of a module given by its dotted name inside the package (``analyses.lens.logit`` -> analyses)."""
    return FLOORS.index(module.split(".")[0])


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({m.split('.')[0]}) imports {d} ({d.split('.')[0]})"
                  for m, deps in graph.items() for d in deps if floor(d) > floor(m))


def _modules(package: Path) -> dict[str, Path]:
    """``dotted name -> file``: ``core.errors``, ``analyses`` (a subpackage's ``__init__``), ``__init__`` (the root)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if any(p.startswith(".") or p == "data" for p in parts):
            continue
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(package: Path, name: str = "lens_safety") -> Iterator[tuple[str, ast.Import | ast.ImportFrom, str]]:
    """Every import of the package's own modules, wherever it is in a file: ``(module, node, target)`` with
    ``target`` the dotted name inside the package that the statement names (``""``: the package itself; for
    ``from x import a, b`` it is ``x``, which may be a module or a package holding ``a`` and ``b``)."""
    for module, path in _modules(package).items():
        here = module.split(".") if module != "__init__" else []
        base = here if path.name == "__init__.py" else here[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    if node.level - 1 > len(base):
                        raise AssertionError(f"{path}: relative import beyond the package (level {node.level}).")
                    root = base[: len(base) - (node.level - 1)]
                    yield module, node, ".".join(root + ([node.module] if node.module else []))
                elif node.module == name:
                    yield module, node, ""
                elif node.module and node.module.startswith(name + "."):
                    yield module, node, node.module[len(name) + 1:]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == name or alias.name.startswith(name + "."):
                        yield module, node, alias.name[len(name) + 1:]


def _owner(modules: dict[str, Path], dotted: str) -> str:
    """The module of the package that holds ``dotted`` (itself, or the nearest enclosing module; the root
    ``__init__`` when none)."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or "__init__"


def import_graph(package: Path, name: str = "lens_safety") -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, by dotted name inside the package (``__init__`` is the
    package itself, a subpackage is its ``__init__``).

    Counts ``import name.x``, ``from name.x import y``, ``from name import x``, ``from .x import y``,
    ``from .. import x`` and ``from . import x``, wherever they are in the file.
    """
    modules = _modules(package)
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for module, node, target in _imports(package, name):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            found = {f"{target}.{n}".lstrip(".") for n in names} & set(modules)  # from pkg import module
            graph[module] |= found or {_owner(modules, target)}  # else from pkg.mod import name
        else:
            graph[module].add(_owner(modules, target))
    for module, deps in graph.items():
        deps.discard(module)
    return graph


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def private_crossings(package: Path, name: str = "lens_safety") -> list[str]:
    """Uses of another floor's private names: ``from <module> import _x`` and ``<module>._x`` (the module
    bound by an import of the package) where ``<module>`` sits in another top-level subpackage than the
    importing module. Dunder names (``__version__``) are not private."""
    modules = _modules(package)
    faults: set[str] = set()
    bound: dict[str, dict[str, str]] = {}  # module -> local name -> dotted module name it is bound to

    def check(module: str, source: str, attr: str, line: int) -> None:
        if _private(attr) and floor(source) != floor(module):
            faults.add(f"{module} (line {line}) uses {source}.{attr}")

    for module, node, target in _imports(package, name):
        names = bound.setdefault(module, {})
        for alias in node.names:
            if isinstance(node, ast.Import):
                local = alias.asname or alias.name.partition(".")[0]
                names[local] = target if alias.asname else ""
            elif f"{target}.{alias.name}".lstrip(".") in modules:
                names[alias.asname or alias.name] = f"{target}.{alias.name}".lstrip(".")
            else:
                check(module, _owner(modules, target), alias.name, node.lineno)
    for module, path in modules.items():
        names = bound.get(module, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            chain = _dotted(node.value) if isinstance(node, ast.Attribute) else None
            head, _, rest = (chain or "").partition(".")
            if chain and head in names:
                target = ".".join(p for p in (names[head], rest) if p)
                if target in modules or target == "":
                    check(module, target or "__init__", node.attr, node.lineno)
    return sorted(faults)


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
    assert {"model.loading", "analyses.directions", "behaviour.refusal", "behaviour.judges", "analyses.lens.logit",
            "core.errors", "pipeline"} <= set(graph)
    assert "analyses.directions" in graph["cli"]  # the parser sees function-level imports
    cycles = import_cycles(graph)
    assert not cycles, "Import cycles in lens_safety (move the shared code down a floor):\n" + "\n".join(
        f"{' -> '.join(cycle)}   (all modules on cycles here: {sorted(comp)})" for cycle, comp in cycles)


def test_every_module_sits_on_a_floor_and_nothing_imports_upward():
    graph = import_graph(PACKAGE)
    for module in graph:
        floor(module)  # a new top-level folder must be given its floor in FLOORS
    upward = upward_arrows(graph)
    assert not upward, "Imports that run up the floors " + str(FLOORS) + ":\n" + "\n".join(upward)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "lens_safety"
    pkg.mkdir()
    for name, text in {"__init__.py": "", **files}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg


def test_the_checker_reads_subpackages_and_finds_upward_arrows(tmp_path):
    pkg = _package(tmp_path, {"core/__init__.py": "", "core/errors.py": "",
                              "core/store.py": "def f():\n    from ..analyses import x\n",
                              "analyses/__init__.py": "from .x import run\n",
                              "analyses/x.py": "from ..core.errors import E\nfrom . import y\n"
                                               "from .. import __version__\n",
                              "analyses/y.py": "from ..core import errors\nimport lens_safety.core.store\n"})
    graph = import_graph(pkg)
    assert graph["analyses.x"] == {"core.errors", "analyses.y", "__init__"}
    assert graph["analyses.y"] == {"core.errors", "core.store"} and graph["analyses"] == {"analyses.x"}
    assert graph["core.store"] == {"analyses.x"}
    assert upward_arrows(graph) == ["core.store (core) imports analyses.x (analyses)"]


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


def test_no_module_uses_another_floors_private_names():
    crossings = private_crossings(PACKAGE)
    assert not crossings, ("Private names used from another floor (make the name public in its module):\n"
                           + "\n".join(crossings))


def test_the_private_name_check_reads_imports_and_module_attributes(tmp_path):
    pkg = _package(tmp_path, {"core/__init__.py": "from .store import _helper\n",
                              "core/store.py": "_cache = {}\npublic = 1\ndef _helper():\n    pass\n",
                              "core/stats.py": "from .store import _helper\nfrom . import store\nx = store._cache\n",
                              "analyses/__init__.py": "from .. import __version__\n",
                              "analyses/x.py": "from ..core.store import _helper, public\nfrom ..core import store\n"
                                               "def f():\n    return store._cache, store.public, store.__name__\n",
                              "analyses/y.py": "import lens_safety.core.store\nimport lens_safety.core.stats as st\n"
                                               "a = lens_safety.core.store._cache\nb = st._x\n"
                                               "from lens_safety.core import _helper\n"})
    assert private_crossings(pkg) == ["analyses.x (line 1) uses core.store._helper",
                                      "analyses.x (line 4) uses core.store._cache",
                                      "analyses.y (line 3) uses core.store._cache",
                                      "analyses.y (line 4) uses core.stats._x",
                                      "analyses.y (line 5) uses core._helper"]


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


#: The modules that load without torch, and must stay so: ``import lens_safety`` promises it, and the command
#: line, the judges, the prompts, the figures and the report's registry start fast.
LIGHT = ("__init__", "__main__", "cli",
         "core", "core.assets", "core.errors", "core.figures", "core.htmlreport", "core.parallel", "core.stats",
         "core.store", "core.validation",
         "inputs", "inputs.jailbreaks", "inputs.prompts",
         "model", "model.sources",
         "behaviour", "behaviour.figures", "behaviour.judges", "behaviour.judges.calibrated",
         "behaviour.judges.labelled", "behaviour.judges.model_judge", "behaviour.judges.resolve",
         "behaviour.judges.rules",
         "analyses", "analyses.figures", "analyses.lens",
         "pipeline", "pipeline.config", "pipeline.html", "pipeline.stage")


def _dotted_name(module: str, name: str = "lens_safety") -> str:
    return name if module == "__init__" else f"{name}.{module}"


def test_light_modules_do_not_import_torch():
    """The light modules load without torch: imported one after another in a fresh interpreter, the first that
    brings torch in is named (an import that needs torch belongs inside the function that needs it)."""
    assert set(LIGHT) <= set(_modules(PACKAGE))
    code = ("import sys\nfor name in sys.argv[1:]:\n    __import__(name)\n"
            "    if 'torch' in sys.modules:\n        sys.exit(f'importing {name} loads torch')")
    out = subprocess.run([sys.executable, "-c", code, *map(_dotted_name, LIGHT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


#: Run in a fresh interpreter: does the import statement ``argv[2]`` (with ``argv[1]`` first on the path) load
#: torch? A stand-in answers the first request for torch and stops there, so no real torch loads (fast).
_TORCH_PROBE = """
import importlib.machinery, sys

class TorchRequested(BaseException):
    pass

class StandIn:
    requested = False
    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if fullname == "torch" else None
    def create_module(self, spec):
        StandIn.requested = True
        raise TorchRequested
    def exec_module(self, module):
        pass

sys.path.insert(0, sys.argv[1])
sys.meta_path.insert(0, StandIn())
try:
    exec(sys.argv[2])
except BaseException:
    if not StandIn.requested:
        raise
print(StandIn.requested or "torch" in sys.modules)
"""


def _loads_torch(package: Path, statement: str) -> bool:
    out = subprocess.run([sys.executable, "-c", _TORCH_PROBE, str(package.parent), statement],
                         capture_output=True, text=True, cwd=package.parent)
    assert out.returncode == 0, f"{statement}: {out.stderr}"
    return out.stdout.strip() == "True"


def _nested_imports(path: Path) -> set[tuple[int, int]]:
    """``(line, column)`` of each import statement inside a function or a class body of a file."""
    def walk(node: ast.AST, nested: bool) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if nested and isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            yield from walk(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))

    return {(node.lineno, node.col_offset) for node in walk(ast.parse(path.read_text(encoding="utf-8")), False)}


def misplaced_imports(package: Path, light: tuple[str, ...], name: str = "lens_safety") -> list[str]:
    """Imports of the package's own modules inside a function or a class that belong at the module top: all of
    them outside the ``light`` modules; inside a light module those that load no torch (a light module keeps an
    import lazy only to stay torch-free)."""
    modules = _modules(package)
    nested = {module: _nested_imports(path) for module, path in modules.items()}
    probed: dict[str, bool] = {}
    faults = []
    for module, node, target in _imports(package, name):
        if (node.lineno, node.col_offset) not in nested[module]:
            continue
        where = ".".join(p for p in (name, target) if p)
        statement = (f"import {where}" if isinstance(node, ast.Import)
                     else f"from {where} import {', '.join(a.name for a in node.names)}")
        if module not in light:
            faults.append((module, node.lineno, statement))
        elif not probed.setdefault(statement, _loads_torch(package, statement)):
            faults.append((module, node.lineno, f"{statement} (loads no torch)"))
    return [f"{module} (line {line}): {text}" for module, line, text in sorted(faults)]


def test_own_modules_are_imported_at_module_top():
    faults = misplaced_imports(PACKAGE, LIGHT)
    assert not faults, ("Imports of lens_safety modules inside a function or class; move them to the module top "
                        "(only a module in LIGHT keeps one of a module that loads torch there):\n" + "\n".join(faults))


def test_the_import_placement_check_reads_functions_classes_and_torch(tmp_path):
    pkg = _package(tmp_path, {"heavy.py": "import torch\nx = 1\n", "plain.py": "y = 2\n",
                              "light.py": "from .plain import y\n"
                                          "def f():\n    from .heavy import x\n    from .plain import y\n"
                                          "    import lens_safety.heavy\n",
                              "other.py": "if True:\n    from . import plain\n"
                                          "class K:\n    from .plain import y\n"
                                          "    def m(self):\n        from . import heavy\n"})
    assert misplaced_imports(pkg, ("light",)) == ["light (line 4): from lens_safety.plain import y (loads no torch)",
                                                  "other (line 4): from lens_safety.plain import y",
                                                  "other (line 6): from lens_safety import heavy"]


MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 800, 100, 12


def size_faults(package: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES lines; functions over MAX_FUNCTION_LINES lines (docstring included) or
    with more than MAX_PARAMETERS parameters (``self``/``cls`` and ``*args``/``**kwargs`` not counted: many
    options belong in a config object)."""
    faults = []
    for module, path in _modules(package).items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            faults.append(f"{module}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES or len(params) > MAX_PARAMETERS:
                    faults.append(f"{module}.{node.name} (line {node.lineno}): {lines} lines, {len(params)} parameters")
    return faults


def test_modules_and_functions_stay_small():
    faults = size_faults(PACKAGE)
    assert not faults, ("Split along a seam, or gather options into a config object:\n" + "\n".join(faults))


def test_the_size_check_counts_lines_and_parameters(tmp_path):
    many = ", ".join(f"p{i}" for i in range(MAX_PARAMETERS + 1))
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    pkg = _package(tmp_path, {"ok.py": "def f(self, a, *args, b=1, **kw):\n    return a\n",
                              "wide.py": f"def g({many}):\n    pass\n", "long.py": f"def h():\n{body}\n"})
    assert sorted(size_faults(pkg)) == ["long.h (line 1): 101 lines, 0 parameters",
                                        "wide.g (line 1): 2 lines, 13 parameters"]
