"""queries.sql splits into named blocks, and queries.py wraps exactly those blocks."""

from __future__ import annotations

import ast
import re
from importlib import resources
from pathlib import Path

import pytest

from db import queries
from db.queries import parse_queries


def queries_text() -> str:
    return resources.files("db").joinpath("queries.sql").read_text("utf-8")


# The modules holding typed wrappers: queries.py, and one per family that outgrew it.
WRAPPER_MODULES = ("queries.py", "async_queries.py", "api_queries.py")


def wrapper_block_names() -> dict[str, list[str]]:
    """{function name: block names it passes to sql()} for every function of the wrappers."""
    found: dict[str, list[str]] = {}
    for node in _wrapper_functions():
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found[node.name] = [
                call.args[0].value
                for call in ast.walk(node)
                if isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id == "sql"
                and call.args
                and isinstance(call.args[0], ast.Constant)
                and isinstance(call.args[0].value, str)
            ]
    return found


def _wrapper_functions() -> list[ast.stmt]:
    nodes: list[ast.stmt] = []
    for module in WRAPPER_MODULES:
        tree = ast.parse(resources.files("db").joinpath(module).read_text("utf-8"))
        nodes.extend(tree.body)
    return nodes


def test_parse_named_blocks() -> None:
    text = """-- A header comment that belongs to no block.

-- name: first
SELECT 1;

-- name: second
-- A comment inside the block stays with it.
SELECT $1::int
  + 2;
-- name: third{trailing}
SELECT 3;
""".format(trailing="   ")  # a name line may end in spaces
    parsed = parse_queries(text)
    assert list(parsed) == ["first", "second", "third"]
    assert parsed["first"] == "SELECT 1;"
    assert parsed["second"] == (
        "-- A comment inside the block stays with it.\nSELECT $1::int\n  + 2;"
    )
    assert parsed["third"] == "SELECT 3;"


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="'twice' is defined twice"):
        parse_queries(
            "-- name: twice\nSELECT 1;\n-- name: other\nSELECT 2;\n-- name: twice\nSELECT 3;"
        )


def test_text_without_blocks_parses_to_nothing() -> None:
    assert parse_queries("") == {}
    assert parse_queries("-- just a comment\nSELECT 1;") == {}


def test_name_marker_must_start_a_line() -> None:
    assert list(parse_queries("SELECT 1; -- name: inline\n-- name: real\nSELECT 2;")) == ["real"]


def test_the_shipped_file_parses_with_unique_non_empty_blocks() -> None:
    parsed = parse_queries(queries_text())
    assert parsed, "queries.sql has no named blocks"
    for name, body in parsed.items():
        statements = [ln for ln in body.splitlines() if ln.strip() and not ln.startswith("--")]
        assert statements, f"block {name!r} is empty"


def test_every_wrapper_names_an_existing_block() -> None:
    blocks = set(parse_queries(queries_text()))
    for function, names in wrapper_block_names().items():
        for name in names:
            assert name in blocks, f"queries.{function} uses missing block {name!r}"
            assert queries.sql(name) == parse_queries(queries_text())[name]


def test_every_block_has_a_wrapper() -> None:
    used = {name for names in wrapper_block_names().values() for name in names}
    unused = set(parse_queries(queries_text())) - used
    assert not unused, f"blocks without a typed wrapper in queries.py: {sorted(unused)}"


def test_every_async_wrapper_runs_a_named_block() -> None:
    names = wrapper_block_names()
    for node in _wrapper_functions():
        if isinstance(node, ast.AsyncFunctionDef):
            assert names[node.name], f"queries.{node.name} runs no named block"


def test_parameters_are_numbered_without_gaps() -> None:
    for name, body in parse_queries(queries_text()).items():
        code = "\n".join(ln.split("--", 1)[0] for ln in body.splitlines())
        numbers = {int(n) for n in re.findall(r"\$(\d+)", code)}
        assert numbers == set(range(1, len(numbers) + 1)), f"{name}: parameters {sorted(numbers)}"


def test_unknown_block_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        queries.sql("no_such_block_anywhere")


def test_every_block_says_what_it_does_and_names_its_parameters() -> None:
    for name, body in parse_queries(queries_text()).items():
        lines = body.splitlines()
        comments = [ln for ln in lines if ln.startswith("--")]
        assert comments and not comments[0].startswith("-- $"), f"{name}: no purpose line"
        code = "\n".join(ln.split("--", 1)[0] for ln in lines)
        numbers = sorted({int(n) for n in re.findall(r"\$(\d+)", code)})
        named = sorted(
            int(n)
            for ln in comments
            if ln.startswith("-- $")
            for n in re.findall(r"\$(\d+) = \w+", ln)
        )
        assert named == numbers, f"{name}: parameters {numbers}, named {named}"


def test_every_wrapper_has_a_caller_outside_db() -> None:
    root = Path(__file__).resolve().parents[2]
    used: set[str] = set()
    for package in ("control_plane", "benchmarker", "instance_agent", "benchmarks"):
        for path in (root / package).rglob("*.py"):
            tree = ast.parse(path.read_text("utf-8"))
            used.update(n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute))
            used.update(
                alias.name
                for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module in ("db.queries", "db.async_queries")
                for alias in n.names
            )
    wrappers = {
        node.name
        for node in _wrapper_functions()
        if isinstance(node, ast.AsyncFunctionDef) and not node.name.startswith("_")
    }
    assert sorted(wrappers - used) == []
