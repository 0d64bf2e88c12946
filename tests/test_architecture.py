"""The package's import structure: layers only import lower layers, and nothing imports in a cycle.

Every ``import`` statement counts, also those inside functions (they run when called). Importing
``statten.a.b`` also runs ``statten/a/__init__.py``, so it counts as importing ``statten.a`` too,
except from inside ``statten.a`` itself (Python has that package initialised first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "statten"
# Low to high; a module may import its own layer and the ones before it.
LAYERS = [
    ("statten.fast", "statten.naming"),
    ("statten.neurons", "statten.attention", "statten.layers"),
    ("statten.analysis",),
    ("statten.models",),
    ("statten.factory", "statten.checkpoint", "statten.config"),
    ("statten.data",),
    ("statten.engine",),
    ("statten.bench", "statten.cli"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of statten that ``name`` imports (with their packages, see the docstring)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.add(node.module)
            targets.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for target in targets:
        parts = target.split(".")
        for end in range(2, len(parts) + 1):
            prefix = ".".join(parts[:end])
            inside = name == prefix or name.startswith(prefix + ".")
            if prefix in modules and not inside:
                found.add(prefix)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> int | None:
    for index, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return index
    return None


def test_every_module_has_a_layer() -> None:
    unplaced = [n for n in _modules() if n != "statten" and _layer(n) is None]
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_lower_layers_never_import_upper_ones() -> None:
    upward = [
        f"{name} -> {target}"
        for name, targets in _graph().items()
        for target in targets
        if name != "statten" and _layer(target) > _layer(name)
    ]
    assert not upward, upward


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list | None) -> None:
    assert _cycle(graph) == expected


def test_families_are_named_only_in_their_own_files() -> None:
    """No module outside a family's own file names the family or imports its module."""
    from statten.models import family_names

    own = {f"statten.models.{family}" for family in family_names()}
    offenders = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets & own
        if name not in own and name != "statten.models"
    ]
    assert not offenders, offenders
