"""Public API bodies: every field name is spelled here once, with its validation.

Parsers take the decoded JSON value and return typed requests or raise an `Invalid` error;
renderers turn rows into the exact Bytez v1 shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from benchmarker.model_ids import model_id_problem
from control_plane.device_names import node_of
from control_plane.errors import (
    InvalidBody,
    InvalidField,
    InvalidModelId,
    InvalidParams,
    InvalidPrompt,
    UnknownField,
)
from control_plane.limits import LIMIT_FIELDS, parse_limit_fields, render_limits
from db.rows import InstanceEventRow, InstanceRow, KeyRow, ModelRow
from instance_agent.engines import ENGINES, EngineName, parse_engine
from instance_agent.protocol import InvalidPrompt as InvalidPromptError
from instance_agent.protocol import ProtocolError, validate_params, validate_prompt

# Field names of the public contract.
MODEL = "model"
NAME = "name"
REQUIRED_RAM = "requiredRAM"
BENCHMARKED = "benchmarked"
TASK = "task"
SOURCE = "source"
PARAMETER_BYTES = "parameterBytes"

BYTES_PER_GB = 1_000_000_000


def iso(ts: datetime | None) -> str | None:
    """ISO-8601 UTC with milliseconds and 'Z', as the Bytez API writes timestamps."""
    if ts is None:
        return None
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def require_object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidBody("the request body must be a JSON object")
    return body


def reject_unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise UnknownField(f"unknown field {unknown[0]!r}")


def parse_model_field(body: dict[str, Any]) -> str:
    if MODEL not in body:
        raise InvalidModelId("'model' is required")
    problem = model_id_problem(body[MODEL])
    if problem:
        raise InvalidModelId(f"'model' {problem}")
    value: str = body[MODEL]
    return value


def parse_int_field(body: dict[str, Any], field: str, *, default: int, lo: int, hi: int) -> int:
    """An integer field within [lo, hi]; booleans, floats with fractions, NaN are refused."""
    value = body.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool):
        raise InvalidField(f"'{field}' must be an integer, not a boolean")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidField(f"'{field}' must be a whole number")
        value = int(value)
    if not isinstance(value, int):
        raise InvalidField(f"'{field}' must be an integer")
    if not lo <= value <= hi:
        raise InvalidField(f"'{field}' must be between {lo} and {hi}")
    return value


@dataclass(frozen=True)
class ModelRequest:
    model: str


MODEL_REQUEST_FIELDS = frozenset({MODEL})


def parse_model_request(body: object) -> ModelRequest:
    obj = require_object(body)
    reject_unknown(obj, MODEL_REQUEST_FIELDS)
    return ModelRequest(parse_model_field(obj))


LIST_REQUEST_FIELDS = frozenset({TASK})


def parse_list_request(body: object) -> str | None:
    """The optional `task` filter of POST /model/list; the body is checked like any other."""
    obj = require_object(body)
    reject_unknown(obj, LIST_REQUEST_FIELDS)
    task = obj.get(TASK)
    if task is not None and (not isinstance(task, str) or not 1 <= len(task) <= 64):
        raise InvalidField("'task' must be a task name such as 'text-generation'")
    return task


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
SCOPES = ("admin", "user", "metrics")


KEY_LIMIT_FIELDS = frozenset(LIMIT_FIELDS)


@dataclass(frozen=True)
class KeyCreateRequest:
    name: str
    scope: str
    # Limits given, by column (control_plane/limits.py); absent ones take the default.
    limits: dict[str, int | None] = field(default_factory=dict)


def parse_key_create(body: object) -> KeyCreateRequest:
    obj = require_object(body)
    reject_unknown(obj, frozenset({KEY_NAME, KEY_SCOPE}) | KEY_LIMIT_FIELDS)
    name = obj.get(KEY_NAME, "unnamed")
    if not isinstance(name, str) or not 1 <= len(name) <= 100 or not name.isprintable():
        raise InvalidField("'name' must be 1-100 printable characters")
    scope = obj.get(KEY_SCOPE, "user")
    if scope not in SCOPES:
        raise InvalidField("'scope' must be 'admin', 'user' or 'metrics'")
    return KeyCreateRequest(name, scope, parse_limit_fields(obj))


@dataclass(frozen=True)
class KeyUpdateRequest:
    disabled: bool | None
    change_expiry: bool
    expires_at: datetime | None
    limits: dict[str, int | None] = field(default_factory=dict)


def parse_key_update(body: object) -> KeyUpdateRequest:
    """`{"disabled": bool, "expiresAt": ISO-8601 with a zone or null (never), limits...}`.

    Limits are `monthlyCalls`, `requestsPerMinute`, `concurrentStreams`, `maxApis`,
    `maxInstances`: a whole number (0: unlimited) or null (the MLCP_DEFAULT_* setting).
    """
    obj = require_object(body)
    reject_unknown(obj, frozenset({"disabled", "expiresAt"}) | KEY_LIMIT_FIELDS)
    if not obj:
        raise InvalidField(
            "give 'disabled' (true or false), 'expiresAt' and/or limits such as 'monthlyCalls'"
        )
    disabled = obj.get("disabled")
    if disabled is not None and not isinstance(disabled, bool):
        raise InvalidField("'disabled' must be true or false")
    expires_at: datetime | None = None
    if "expiresAt" in obj and obj["expiresAt"] is not None:
        raw = obj["expiresAt"]
        if not isinstance(raw, str) or len(raw) > 40:
            raise InvalidField("'expiresAt' must be an ISO-8601 time like 2030-01-31T00:00:00Z")
        try:
            expires_at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidField(
                "'expiresAt' must be an ISO-8601 time like 2030-01-31T00:00:00Z"
            ) from None
        if expires_at.tzinfo is None:
            raise InvalidField("'expiresAt' needs a time zone (end it with Z)")
        if not 2000 <= expires_at.year <= 9000:
            raise InvalidField("'expiresAt' must be a year from 2000 to 9000")
    return KeyUpdateRequest(disabled, "expiresAt" in obj, expires_at, parse_limit_fields(obj))


def render_key(row: KeyRow, secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "scope": row.scope,
        "created": iso(row.created_at),
        "revoked": iso(row.revoked_at),
        "disabled": iso(row.disabled_at),
        "expiresAt": iso(row.expires_at),
        # The key's own limits; null: the MLCP_DEFAULT_* setting, 0: unlimited.
        "limits": render_limits(row.limits),
    }
    if secret is not None:
        out["key"] = secret
    return out


# -- instances ----------------------------------------------------------------------------------

CONCURRENCY = "concurrency"
EXPIRATION_S = "expirationPeriodSeconds"
PROMPT = "prompt"
PARAMS = "params"
STREAM = "stream"
MAX_CONCURRENCY = 64
MAX_EXPIRATION_S = 2_592_000  # 30 days


DRY_RUN = "dryRun"
BENCHMARK = "benchmark"
DEVICE = "device"
ENGINE = "engine"
# "auto": a GPU where the host has one, else the host; "cpu" or "cuda": that kind only.
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class LoadRequest:
    model: str
    concurrency: int
    expiration_s: int
    dry_run: bool = False
    benchmark: bool = False
    device: str = "auto"
    # None: the model's files choose (instance_agent/engines.py).
    engine: EngineName | None = None


def parse_engine_field(body: dict[str, Any]) -> EngineName | None:
    try:
        return parse_engine(body.get(ENGINE))
    except ValueError as exc:
        raise InvalidField(f"'{ENGINE}' must be one of {', '.join(ENGINES)}") from exc


def parse_device_field(body: dict[str, Any]) -> str:
    value = body.get(DEVICE, "auto")
    if not isinstance(value, str) or value not in DEVICE_CHOICES:
        raise InvalidField(f"'{DEVICE}' must be one of {', '.join(DEVICE_CHOICES)}")
    return value


def parse_bool_field(body: dict[str, Any], field: str) -> bool:
    value = body.get(field, False)
    if not isinstance(value, bool):
        raise InvalidField(f"'{field}' must be true or false")
    return value


def parse_load_request(body: object, default_expiration_s: int) -> LoadRequest:
    obj = require_object(body)
    reject_unknown(
        obj, frozenset({MODEL, CONCURRENCY, EXPIRATION_S, DRY_RUN, BENCHMARK, DEVICE, ENGINE})
    )
    return LoadRequest(
        parse_model_field(obj),
        parse_int_field(obj, CONCURRENCY, default=1, lo=1, hi=MAX_CONCURRENCY),
        parse_int_field(obj, EXPIRATION_S, default=default_expiration_s, lo=1, hi=MAX_EXPIRATION_S),
        parse_bool_field(obj, DRY_RUN),
        parse_bool_field(obj, BENCHMARK),
        parse_device_field(obj),
        parse_engine_field(obj),
    )


@dataclass(frozen=True)
class RunRequest:
    model: str
    payload: dict[str, Any]  # what the agent receives: validated prompt and params
    stream: bool


def parse_run_request(body: object) -> RunRequest:
    obj = require_object(body)
    reject_unknown(obj, frozenset({MODEL, PROMPT, PARAMS, STREAM}))
    model = parse_model_field(obj)
    stream = obj.get(STREAM, False)
    if not isinstance(stream, bool):
        raise InvalidField("'stream' must be true or false")
    if PROMPT not in obj:
        raise InvalidPrompt("'prompt' is required")
    params = obj.get(PARAMS)
    if params is None:
        params = {}
    try:
        validate_prompt(obj[PROMPT])
        if params != {}:  # the common case; validating nothing costs ~10 µs per request
            validate_params(params)
    except InvalidPromptError as exc:
        raise InvalidPrompt(exc.message) from exc
    except ProtocolError as exc:
        raise InvalidParams(exc.message) from exc
    return RunRequest(model, {PROMPT: obj[PROMPT], PARAMS: params}, stream)


def render_status(
    row: InstanceRow,
    *,
    pending_inferences: int = 0,
    in_flight: int = 0,
) -> dict[str, Any]:
    """The Bytez status object, with this node's not-yet-flushed inferences folded in.

    The expiry is the row's, on the database's clock: callers flush activity first.
    """
    expires = row.expires_at
    return {
        MODEL: row.model,
        "status": row.state,
        CONCURRENCY: row.concurrency,
        "inferences": row.inferences + pending_inferences,
        EXPIRATION_S: row.expiration_s,
        "expirationPeriodMinutes": round(row.expiration_s / 60, 3),
        "expiresAt": iso(expires) if row.state in ("STARTING", "RUNNING") else None,
        "created": iso(row.created_at),
        "modified": iso(row.modified_at),
        "reason": row.reason,
        "inFlight": in_flight,
        "runtime": row.runtime,
        "device": row.device,
        # The cluster node it runs on (the ray runtime); null on one host.
        "node": node_of(row.device),
        ENGINE: row.engine,
        "reservedBytes": row.reserved_bytes,
        "observedBytes": row.observed_mem_bytes,
    }


def render_event(ev: InstanceEventRow) -> dict[str, Any]:
    return {"from": ev.from_state, "to": ev.to_state, "reason": ev.reason, "at": iso(ev.at)}
