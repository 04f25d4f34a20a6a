"""Packages depend one way: `db` and `instance_agent` ← `benchmarker` ← `control_plane`.

Read from the source (every import statement, also those inside functions), so an import
hidden in a rarely run branch fails here too; then checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.unit.test_imports import modules_after

ROOT = Path(__file__).resolve().parents[2]
# package -> the first-party packages it must never import
FORBIDDEN = {
    "db": {"control_plane", "benchmarker", "instance_agent"},
    "instance_agent": {"control_plane", "benchmarker"},
    "benchmarker": {"control_plane"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from control_plane.settings import Settings\n")
    assert imported_packages(module) == {"control_plane"}


def test_importing_every_benchmarker_module_loads_no_control_plane() -> None:
    loaded = modules_after(
        """
        import importlib, pkgutil
        import benchmarker
        for info in pkgutil.walk_packages(benchmarker.__path__, "benchmarker."):
            importlib.import_module(info.name)
        """
    )
    assert "benchmarker.worker" in loaded
    assert [m for m in loaded if m.split(".")[0] == "control_plane"] == []
