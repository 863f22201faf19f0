"""The import graph of the package: no cycles, and no module imports another module's private names.

Every module of qdlm_bench (with qdlm_bench.methods and qdlm_bench.tasks, which a checkout keeps in
methods/ and tasks/) is parsed with ``ast``; its imports at any depth (functions included) that name
a first-party module are the graph's edges. A package's ``__init__`` may import its own submodules
(re-exports, registries), so those edges are left out, and it may import their private names.
Imports under ``if TYPE_CHECKING:`` never run: they count for private names, not for cycles.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ("qdlm_bench", "qdlm_bench.methods", "qdlm_bench.tasks")

# Known violations in code under restructuring, each to be fixed and then removed from its list:
# a cycle as the set of its modules; a private import as (importer, "module.name").
KNOWN_CYCLES: list[set[str]] = []
KNOWN_PRIVATE_IMPORTS: list[tuple[str, str]] = []


def package_modules() -> dict[str, Path]:
    """{dotted module name: file} of every module of PACKAGES (folders without __init__.py are data)."""
    found = {}
    for package in PACKAGES:
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if not all((root / Path(*parts[:i]) / "__init__.py").is_file() for i in range(len(parts))):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.setdefault(".".join((package, *parts)), path)
    return found


MODULES = package_modules()


def _type_checking_nodes(tree: ast.AST) -> set[ast.AST]:
    """The statements inside ``if TYPE_CHECKING:`` blocks."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            inside |= {n for stmt in node.body for n in ast.walk(stmt)}
    return inside


def imports(name: str) -> list[tuple[str, str | None, bool]]:
    """(module, imported name or None, runs at import time or call time) of each first-party
    import of module ``name``; the module is the most specific one the statement names."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                parent = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            targets = [(base, alias.name) for alias in node.names]
        else:
            continue
        for module, imported in targets:
            if imported is not None and f"{module}.{imported}" in MODULES:
                module, imported = f"{module}.{imported}", None
            while module and module not in MODULES:
                module = module.rpartition(".")[0]
            if module:
                found.append((module, imported, node not in typing_only))
    return found


def _own_submodule(importer: str, module: str) -> bool:
    return MODULES[importer].name == "__init__.py" and module.startswith(importer + ".")


def graph() -> dict[str, set[str]]:
    """{module: the first-party modules it imports at run time}, without a package's own submodules."""
    return {name: {m for m, _, runs in imports(name) if runs and m != name and not _own_submodule(name, m)}
            for name in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def private_imports() -> list[tuple[str, str]]:
    """(importer, "module.name") of each private name a module imports from another module."""
    return sorted({(name, f"{module}.{imported}") for name in MODULES for module, imported, _ in imports(name)
                   if imported and imported.startswith("_") and not imported.endswith("__")
                   and module != name and not _own_submodule(name, module)})


def test_the_walk_finds_the_package():
    assert {"qdlm_bench.report", "qdlm_bench.calibration", "qdlm_bench.calibration.sources",
            "qdlm_bench.methods", "qdlm_bench.zoo.corpus"} <= set(MODULES)


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycles():
    found = cycles(graph())
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in new)
    fixed = [c for c in KNOWN_CYCLES if c not in found]
    assert not fixed, f"no longer cycles, remove them from KNOWN_CYCLES: {fixed}"


def test_no_private_names_imported_across_modules():
    found = private_imports()
    new = [p for p in found if p not in KNOWN_PRIVATE_IMPORTS]
    assert not new, "private names imported from other modules:\n" + "\n".join(f"{a} imports {b}" for a, b in new)
    fixed = [p for p in KNOWN_PRIVATE_IMPORTS if p not in found]
    assert not fixed, f"no longer imported, remove them from KNOWN_PRIVATE_IMPORTS: {fixed}"


def test_calibration_reads_the_zoo_and_lm_eval_tasks_through_sources_only():
    readers = {name for name in MODULES if name.startswith("qdlm_bench.calibration") for m, _, _ in imports(name)
               if m in ("qdlm_bench.zoo.corpus", "qdlm_bench.evaluation.tasks")}
    assert readers == {"qdlm_bench.calibration.sources"}


@pytest.mark.parametrize("statement", ["from qdlm_bench.calibration import CalibConfig",
                                       "from qdlm_bench.generation import GenerationConfig"])
def test_configs_load_without_torch(statement):
    code = f"import sys; {statement}; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
