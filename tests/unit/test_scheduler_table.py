"""Every periodic loop is in the one table, and the table names no loop that does not run."""

from __future__ import annotations

import ast
from pathlib import Path

from control_plane.scheduler import LOOPS

SOURCE = Path(__file__).resolve().parents[2] / "control_plane" / "scheduler.py"


def test_the_jobs_bound_are_exactly_the_table() -> None:
    tree = ast.parse(SOURCE.read_text("utf-8"))
    build = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "build_scheduler"
    )
    bound: set[str] = set()
    for node in ast.walk(build):
        if isinstance(node, ast.Dict):
            bound.update(k.value for k in node.keys if isinstance(k, ast.Constant))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            if not isinstance(node.slice.value, str):
                continue
            bound.add(node.slice.value)
    assert bound == set(LOOPS)


def test_every_interval_is_positive_and_every_loop_says_what_it_does() -> None:
    for name, (seconds, purpose) in LOOPS.items():
        assert seconds is None or seconds > 0, name
        assert len(purpose) > 20, name
