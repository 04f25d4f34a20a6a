"""Public API bodies: every field name is spelled here once, with its validation.

Parsers take the decoded JSON value and return typed requests or raise `Invalid`; renderers turn
rows into the exact Bytez v1 shapes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from control_plane.errors import Invalid
from db.rows import KeyRow, ModelRow

# Field names of the public contract.
MODEL = "model"
NAME = "name"
REQUIRED_RAM = "requiredRAM"
BENCHMARKED = "benchmarked"
TASK = "task"
SOURCE = "source"
PARAMETER_BYTES = "parameterBytes"

_MODEL_ID_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")
MODEL_ID_MAX_LEN = 96
BYTES_PER_GB = 1_000_000_000


def iso(ts: datetime | None) -> str | None:
    """ISO-8601 UTC with milliseconds and 'Z', as the Bytez API writes timestamps."""
    if ts is None:
        return None
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def model_id_problem(value: object) -> str | None:
    """Why `value` is not a valid Hub model id ("org/name"), or None when it is.

    The Hub's rules: 1-96 characters of [A-Za-z0-9._-] with exactly one '/', no '..' or '--',
    and no part that starts or ends with '-' or '.'. Ids that pass can never name a path outside
    the folder they are joined to.
    """
    if not isinstance(value, str):
        return "must be a string like 'org/name'"
    if not value:
        return "must not be empty"
    if len(value) > MODEL_ID_MAX_LEN:
        return f"must be at most {MODEL_ID_MAX_LEN} characters"
    if value.count("/") != 1:
        return "must have the form 'org/name' (exactly one '/')"
    if ".." in value or "--" in value:
        return "must not contain '..' or '--'"
    for part in value.split("/"):
        if not part:
            return "must have a non-empty organisation and name"
        if not _MODEL_ID_CHARS.match(part):
            return "may only contain letters, digits, '.', '_' and '-'"
        if part[0] in "-." or part[-1] in "-.":
            return "parts must not start or end with '-' or '.'"
    return None


def is_valid_model_id(value: object) -> bool:
    return model_id_problem(value) is None


def require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise Invalid("the request body must be a JSON object", code="invalid_body")
    return body


def reject_unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Invalid(f"unknown field {unknown[0]!r}", code="unknown_field")


def parse_model_field(body: dict[str, Any]) -> str:
    if MODEL not in body:
        raise Invalid("'model' is required", code="invalid_model")
    problem = model_id_problem(body[MODEL])
    if problem:
        raise Invalid(f"'model' {problem}", code="invalid_model")
    value: str = body[MODEL]
    return value


def parse_int_field(
    body: dict[str, Any], field: str, *, default: int, lo: int, hi: int
) -> int:
    """An integer field within [lo, hi]; booleans, floats with fractions, NaN are refused."""
    value = body.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool):
        raise Invalid(f"'{field}' must be an integer, not a boolean", code="invalid_field")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise Invalid(f"'{field}' must be a whole number", code="invalid_field")
        value = int(value)
    if not isinstance(value, int):
        raise Invalid(f"'{field}' must be an integer", code="invalid_field")
    if not lo <= value <= hi:
        raise Invalid(f"'{field}' must be between {lo} and {hi}", code="invalid_field")
    return value


@dataclass(frozen=True)
class ModelRequest:
    model: str


MODEL_REQUEST_FIELDS = frozenset({MODEL})


def parse_model_request(body: object) -> ModelRequest:
    obj = require_object(body)
    reject_unknown(obj, MODEL_REQUEST_FIELDS)
    return ModelRequest(parse_model_field(obj))


def required_ram_gb(mem_bytes: int | None) -> float | None:
    return None if mem_bytes is None else mem_bytes / BYTES_PER_GB


def render_model(row: ModelRow) -> dict[str, Any]:
    return {
        NAME: row.name,
        REQUIRED_RAM: required_ram_gb(row.required_ram_bytes),
        BENCHMARKED: row.required_ram_bytes is not None,
        TASK: row.task,
        SOURCE: row.source_kind,
        PARAMETER_BYTES: row.param_bytes,
    }


# -- keys ---------------------------------------------------------------------------------------

KEY_NAME = "name"
KEY_SCOPE = "scope"
SCOPES = ("admin", "user")


@dataclass(frozen=True)
class KeyCreateRequest:
    name: str
    scope: str


def parse_key_create(body: object) -> KeyCreateRequest:
    obj = require_object(body)
    reject_unknown(obj, frozenset({KEY_NAME, KEY_SCOPE}))
    name = obj.get(KEY_NAME, "unnamed")
    if not isinstance(name, str) or not 1 <= len(name) <= 100 or not name.isprintable():
        raise Invalid("'name' must be 1-100 printable characters", code="invalid_field")
    scope = obj.get(KEY_SCOPE, "user")
    if scope not in SCOPES:
        raise Invalid("'scope' must be 'admin' or 'user'", code="invalid_field")
    return KeyCreateRequest(name, scope)


def render_key(row: KeyRow, secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "scope": row.scope,
        "created": iso(row.created_at),
        "revoked": iso(row.revoked_at),
    }
    if secret is not None:
        out["key"] = secret
    return out
