"""The package's layout as issue 23 set it: folders are layers, no import cycles, small modules.

Every ``import`` of the package counts, also those under ``TYPE_CHECKING`` and inside functions: a
cycle hidden in a function is still a cycle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "airflow_provider_kontext"
NAME = "airflow_provider_kontext"

#: The package root: the public surface only (folders are listed in LAYERS).
ROOT_MODULES = {"__init__.py", "exceptions.py", "get_provider_info.py", "py.typed"}

#: Each folder is one layer; a module may import its own layer and the layers before it.
LAYERS = [
    {"exceptions", "compat", "__init__"},
    {"models"},
    {"hooks"},
    {"edits"},
    {"triggers", "links"},
    {"operators", "sensors"},
    {"plugins"},
    {"testing"},
    {"get_provider_info"},  # metadata about every layer
]
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Return the package's modules that ``path`` imports (``from package import module`` included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    found.discard(module_name(path))
    return found


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports_of(path, known) for name, path in modules().items()}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(index for index, layer in enumerate(LAYERS) if top in layer)


def test_the_root_holds_only_the_public_surface() -> None:
    files = {path.name for path in PACKAGE.iterdir() if path.is_file()}
    assert files == ROOT_MODULES


def test_every_folder_is_a_known_layer() -> None:
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"}
    assert folders == set().union(*LAYERS) - {"exceptions", "get_provider_info", "__init__"}


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    cycles: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = [name.removeprefix(NAME + ".") for name in [*stack[stack.index(target) :], target]]
                cycles.append(" -> ".join(cycle))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_module_imports_a_later_layer() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in sorted(targets)
        if module != NAME and layer_of(target) > layer_of(module)
    ]
    assert upward == []


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_small(name: str) -> None:
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines"
