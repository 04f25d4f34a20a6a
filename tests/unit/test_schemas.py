"""Model id rules (the Hub's) and the small parsers and renderers of control_plane.schemas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from benchmarker.model_ids import is_valid_model_id, model_id_problem
from control_plane.errors import Invalid
from control_plane.schemas import (
    iso,
    parse_int_field,
    parse_key_create,
    parse_model_request,
    render_key,
    render_model,
)
from db.rows import KeyRow, ModelRow

VALID_IDS = [
    "a/b",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
    "openai-community/gpt2",
    "org_1/model.v2",
    "A.B/c_d-e",
    "x/" + "y" * 94,  # 96 characters: the longest allowed
    "0/9",
    "a-b/c.d",
    "_org/_name_",  # '_' may start and end a part
]

INVALID_IDS = [
    ("", "empty"),
    ("gpt2", "no slash"),
    ("a/b/c", "two slashes"),
    ("/abs", "empty org"),
    ("org/", "empty name"),
    ("/", "only a slash"),
    ("x/" + "y" * 95, "97 characters"),
    ("../etc/passwd", "dot-dot path"),
    ("a/../b", "dot-dot in the middle"),
    ("a/b..c", "dot-dot inside a part"),
    ("org--x/y", "double dash"),
    ("org/x--y", "double dash in name"),
    ("-org/x", "org starts with '-'"),
    ("org-/x", "org ends with '-'"),
    ("x/y-", "name ends with '-'"),
    ("x/-y", "name starts with '-'"),
    (".hidden/x", "org starts with '.'"),
    ("x/.hidden", "name starts with '.'"),
    ("x/y.", "name ends with '.'"),
    ("org./x", "org ends with '.'"),
    ("a b/c", "space"),
    (" a/b", "leading space"),
    ("a/b ", "trailing space"),
    ("a/b\n", "newline"),
    ("a/b\x00", "NUL"),
    ("a%2Fb/c", "percent sign"),
    ("%2e%2e/x", "percent-encoded dots"),
    ("ünï/cödé", "non-ASCII letters"),
    ("a/b\u200b", "zero-width space"),
    ("a\\b/c", "backslash"),
    ("a:b/c", "colon"),
    ("~/x", "tilde"),
    ("a/b?c", "query character"),
    ("a/b#c", "fragment character"),
    ("a/b*", "glob character"),
]


@pytest.mark.parametrize("value", VALID_IDS)
def test_valid_model_ids(value: str) -> None:
    assert model_id_problem(value) is None
    assert is_valid_model_id(value)


@pytest.mark.parametrize(("value", "why"), INVALID_IDS, ids=[w for _, w in INVALID_IDS])
def test_invalid_model_ids(value: str, why: str) -> None:
    problem = model_id_problem(value)
    assert isinstance(problem, str) and problem
    assert not is_valid_model_id(value)


@pytest.mark.parametrize("value", [None, 1, 1.5, True, ["a/b"], {"a": "b"}, b"a/b"])
def test_non_string_model_ids(value: object) -> None:
    assert model_id_problem(value) == "must be a string like 'org/name'"


def test_valid_ids_cannot_escape_a_folder(tmp_path: Any) -> None:
    # The promise behind the rules: a valid id joined to a folder stays inside it.
    for value in VALID_IDS:
        joined = (tmp_path / value).resolve()
        assert joined.is_relative_to(tmp_path.resolve())


def test_parse_model_request() -> None:
    assert parse_model_request({"model": "a/b"}).model == "a/b"
    for body, code in [
        ([], "invalid_body"),
        ("a/b", "invalid_body"),
        (None, "invalid_body"),
        ({}, "invalid_model"),
        ({"model": "a"}, "invalid_model"),
        ({"model": None}, "invalid_model"),
        ({"model": "a/b", "extra": 1}, "unknown_field"),
    ]:
        with pytest.raises(Invalid) as info:
            parse_model_request(body)
        assert info.value.code == code
        assert info.value.status_code == 422


@pytest.mark.parametrize(
    ("body", "expected"),
    [({}, 3), ({"n": None}, 3), ({"n": 5}, 5), ({"n": 5.0}, 5), ({"n": 1}, 1), ({"n": 10}, 10)],
)
def test_parse_int_field_accepts(body: dict[str, Any], expected: int) -> None:
    assert parse_int_field(body, "n", default=3, lo=1, hi=10) == expected


@pytest.mark.parametrize(
    "value", [True, False, 5.5, float("nan"), float("inf"), "5", [5], 0, 11, -1, 10**30]
)
def test_parse_int_field_refuses(value: object) -> None:
    with pytest.raises(Invalid):
        parse_int_field({"n": value}, "n", default=3, lo=1, hi=10)


def test_parse_key_create() -> None:
    assert parse_key_create({}) == parse_key_create({"name": "unnamed", "scope": "user"})
    req = parse_key_create({"name": "ci", "scope": "admin"})
    assert (req.name, req.scope) == ("ci", "admin")
    for body in [
        {"name": ""},
        {"name": "x" * 101},
        {"name": 3},
        {"name": "a\nb"},
        {"scope": "root"},
        {"scope": None},
        {"secret": "x"},
        [],
    ]:
        with pytest.raises(Invalid):
            parse_key_create(body)


def test_iso_timestamps() -> None:
    assert iso(None) is None
    ts = datetime(2024, 5, 28, 0, 12, 18, 738_999, tzinfo=UTC)
    assert iso(ts) == "2024-05-28T00:12:18.738Z"
    # Other zones are converted to UTC.
    plus2 = datetime(2024, 5, 28, 2, 12, 18, tzinfo=timezone(timedelta(hours=2)))
    assert iso(plus2) == "2024-05-28T00:12:18.000Z"


def test_render_model_until_and_after_benchmark() -> None:
    row = ModelRow("a/b", "text-generation", "dir", "/m", None, 10, None, None, True)
    out = render_model(row)
    assert out["name"] == "a/b"
    assert out["requiredRAM"] is None
    assert out["benchmarked"] is False
    assert out["task"] == "text-generation"
    measured = render_model(
        ModelRow("a/b", "text-generation", "dir", "/m", None, 10, 1_500_000_000, None, True)
    )
    assert measured["requiredRAM"] == 1.5
    assert measured["benchmarked"] is True


def test_render_key_shows_secret_only_when_given() -> None:
    row = KeyRow(1, "ci", "mlcp_abcdef", "user", datetime(2024, 1, 1, tzinfo=UTC), None)
    assert "key" not in render_key(row)
    assert render_key(row, "mlcp_secret")["key"] == "mlcp_secret"
    assert render_key(row)["created"] == "2024-01-01T00:00:00.000Z"
    assert render_key(row)["revoked"] is None


@pytest.mark.parametrize("device", ["gpu", "cuda:0", "", 1, None, True])
def test_load_device_is_one_of_auto_cpu_cuda(device: object) -> None:
    from control_plane.errors import InvalidField
    from control_plane.schemas import parse_load_request

    with pytest.raises(InvalidField, match="'device' must be one of auto, cpu, cuda"):
        parse_load_request({"model": "org/m", "device": device}, 60)
    assert parse_load_request({"model": "org/m"}, 60).device == "auto"
    assert parse_load_request({"model": "org/m", "device": "cpu"}, 60).device == "cpu"
