"""The package's layers: a module imports only from its own layer or a lower one, and no modules import each
other in a circle. Every import counts: at module level, inside functions and under ``TYPE_CHECKING``.

0. ``_checks`` (argument checks: no imports from the package at all), ``errors``, ``_compat``, ``keys``, ``events``
1. ``measure/``   2. ``decide/``   3. ``recovery/``   4. ``options``   5. ``outputs/``   6. ``step``
7. ``frontends/``   8. the package's ``__init__`` (the public API) and ``__main__``
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "lightning_gradguard"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: The layer of each top-level part of the package (a module or a subpackage).
LAYERS: dict[str, int] = {
    "_checks": 0,
    "_state": 0,
    "errors": 0,
    "_compat": 0,
    "keys": 0,
    "events": 0,
    "measure": 1,
    "decide": 2,
    "recovery": 3,
    "options": 4,
    "records": 4,
    "forensics": 4,
    "outputs": 5,
    "step": 6,
    "frontends": 7,
    "__init__": 8,
    "__main__": 8,
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg.sub`` for ``pkg/sub/__init__.py``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its source."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    here = name if _is_package(name) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{anchor}.{base}" if base else anchor
            # ``from pkg import module`` imports the module; ``from module import name`` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import pkg.sub.mod`` names a module; keep the longest known
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    part = parts[1] if len(parts) > 1 else "__init__"
    assert part in LAYERS, f"{name} has no layer: add {part!r} to LAYERS"
    return LAYERS[part]


GRAPH = {name: _imports(name) for name in MODULES}


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        _layer(name)


def test_argument_checks_import_nothing_from_the_package() -> None:
    assert GRAPH[f"{PACKAGE}._checks"] == set()
    assert GRAPH[f"{PACKAGE}.errors"] == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_from_a_higher_layer(name: str) -> None:
    upward = sorted(t for t in GRAPH[name] if _layer(t) > _layer(name) and not name.startswith(f"{t}."))
    assert upward == [], f"{name} (layer {_layer(name)}) imports " + ", ".join(
        f"{t} (layer {_layer(t)})" for t in upward
    )


def _subpackage_inits(name: str, target: str) -> bool:
    """``pkg.sub.mod`` importing ``pkg.sub`` runs ``pkg/sub/__init__.py`` first: not an edge of a circle."""
    return name.startswith(f"{target}.")


def test_no_import_circle() -> None:
    graph = {name: {t for t in targets if not _subpackage_inits(name, t)} for name, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert circles == [], "\n".join(" -> ".join(circle) for circle in circles)


def test_the_checker_sees_imports_inside_functions_and_under_type_checking() -> None:
    """Guards the parser itself: the lazy public API and the factory are found through such imports."""
    assert f"{PACKAGE}.frontends.lightning" in GRAPH[PACKAGE]  # only under TYPE_CHECKING and in __getattr__ strings
    assert f"{PACKAGE}.decide.engine" in GRAPH[f"{PACKAGE}.options"]
