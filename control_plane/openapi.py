"""The OpenAPI 3.1 document for every public route, built from one table."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from control_plane.limits import LIMIT_FIELDS

_ERROR = {
    "type": "object",
    "required": ["error", "code"],
    "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
}
# As strict as the server's check (schemas.model_id_problem) or stricter: every id this pattern
# allows is accepted; no '..' or '--', no part starting or ending with '.' or '-'.
_ID_PART = r"[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*"
_MODEL_ID = {
    "type": "string",
    "minLength": 3,
    "maxLength": 96,
    "pattern": f"^{_ID_PART}/{_ID_PART}$",
}
_TS = {"type": ["string", "null"], "format": "date-time"}
_MODEL_BODY = {
    "type": "object",
    "required": ["model"],
    "properties": {"model": _MODEL_ID},
    "additionalProperties": False,
}
_MODEL_ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "requiredRAM": {"type": ["number", "null"], "description": "GB, measured"},
        "benchmarked": {"type": "boolean"},
        "task": {"type": "string"},
        "source": {"type": "string"},
        "parameterBytes": {"type": ["integer", "null"]},
    },
}
_KEY = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "prefix": {"type": "string"},
        "scope": {"enum": ["admin", "user"]},
        "created": _TS,
        "revoked": _TS,
        "disabled": _TS,
        "expiresAt": _TS,
        "key": {"type": "string", "description": "only when created"},
        "limits": {"type": "object", "description": "own limits; null: the default, 0: none"},
        "effectiveLimits": {"type": "object", "description": "the limits that apply"},
    },
}
# Per-key limits: a whole number (0: unlimited) or null (the MLCP_DEFAULT_* setting).
_LIMITS = {
    name: {"type": ["integer", "null"], "minimum": 0, "maximum": most}
    for name, (_, most) in LIMIT_FIELDS.items()
}
_STATUS = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "status": {"enum": ["STARTING", "RUNNING", "STOPPING", "STOPPED", "FAILED"]},
        "concurrency": {"type": "integer"},
        "inferences": {"type": "integer"},
        "expirationPeriodSeconds": {"type": "integer"},
        "expirationPeriodMinutes": {"type": "number"},
        "expiresAt": _TS,
        "created": _TS,
        "modified": _TS,
        "reason": {"type": ["string", "null"]},
        "inFlight": {"type": "integer"},
        "runtime": {"type": "string"},
        "device": {"type": "string"},
        "node": {"type": ["string", "null"], "description": "the Ray node (MLCP_RUNTIME=ray)"},
        "engine": {
            "type": ["string", "null"],
            "enum": ["transformers", "llama.cpp", None],
            "description": "what generates text; null for models that generate none",
        },
        "reservedBytes": {"type": "integer"},
        "observedBytes": {"type": ["integer", "null"]},
        "endpoint": {"type": ["string", "null"], "description": "admin keys only"},
        "history": {
            "type": "array",
            "description": "/model/status only",
            "items": {
                "type": "object",
                "properties": {
                    "from": {"type": ["string", "null"]},
                    "to": {"type": "string"},
                    "reason": {"type": ["string", "null"]},
                    "at": _TS,
                },
            },
        },
    },
}

# Extra schemas that later routes register (kept here so the document is in one place).
SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _ERROR,
    "ModelBody": _MODEL_BODY,
    "ModelItem": _MODEL_ITEM,
    "Key": _KEY,
    "InstanceStatus": _STATUS,
}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    scope: str | None  # None: no auth
    body: str | None = None
    response: dict[str, Any] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    ok_status: int = 200
    content_types: tuple[str, ...] = ("application/json",)
    parameters: tuple[dict[str, Any], ...] = ()
    # The request body's media type (an upload's PUT is the file's bytes).
    body_media: str = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_AUTH_ERRORS = (400, 401, 413, 415, 422)

OPERATIONS: list[Operation] = [
    Operation("get", "/health", "The process is up", None, response={"type": "object"}),
    Operation(
        "get",
        "/ready",
        "The database is reachable",
        None,
        response={"type": "object"},
        errors=(503,),
    ),
    Operation("get", "/openapi.json", "This document", None, response={"type": "object"}),
    Operation(
        "get",
        "/model/list",
        "The catalog",
        "user",
        response={"type": "array", "items": _ref("ModelItem")},
        errors=(401,),
    ),
    Operation(
        "post",
        "/model/list",
        "The catalog, optionally of one task",
        "user",
        body="ModelListBody",
        response={"type": "array", "items": _ref("ModelItem")},
        errors=_AUTH_ERRORS,
    ),
    Operation(
        "post",
        "/model/job",
        "Request a model: queue its benchmark or report its job",
        "user",
        body="ModelBody",
        response=_ref("ModelJob"),
        errors=_AUTH_ERRORS,
    ),
    Operation(
        "post",
        "/admin/keys",
        "Create an API key (its secret is shown once)",
        "admin",
        body="KeyCreate",
        response=_ref("Key"),
        errors=(*_AUTH_ERRORS, 403),
        ok_status=201,
    ),
    Operation(
        "get",
        "/admin/keys",
        "List API keys (never their secrets)",
        "admin",
        response={"type": "array", "items": _ref("Key")},
        errors=(401, 403),
    ),
    Operation(
        "delete",
        "/admin/keys/{key_id}",
        "Revoke an API key (the last active admin key cannot be revoked: 409)",
        "admin",
        response=_ref("Key"),
        errors=(401, 403, 404, 409),
    ),
    Operation(
        "patch",
        "/admin/keys/{key_id}",
        "Disable or enable a key, set or clear its expiry, set its limits (last admin key: 409)",
        "admin",
        body="KeyUpdate",
        response=_ref("Key"),
        errors=(*_AUTH_ERRORS, 403, 404, 409),
    ),
]
SCHEMAS["KeyUpdate"] = {
    "type": "object",
    "minProperties": 1,
    "properties": {
        "disabled": {"type": "boolean"},
        # Years 2000-8999: stricter than the server's 2000-9000.
        "expiresAt": {
            "type": ["string", "null"],
            "format": "date-time",
            "pattern": "^[2-8][0-9]{3}-",
        },
        **_LIMITS,
    },
    "additionalProperties": False,
}
OPERATIONS.append(
    Operation(
        "get",
        "/usage",
        "Calls per key in a month (a user key: its own; an admin key: every key)",
        "user",
        response={"type": "object", "properties": {"month": {"type": "string"}}},
        errors=(400, 401),
        parameters=(
            {
                "name": "month",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "pattern": "^[2-9][0-9]{3}-(0[1-9]|1[0-2])$"},
            },
        ),
    )
)

# Instances: /model/load, /model/status, /model/run, /model/instances, /model/delete.
_INSTANCE_LIST = {"type": "array", "items": _ref("InstanceStatus")}
OPERATIONS += [
    Operation(
        "post",
        "/model/load",
        "Start an instance of a model (or retune the live one)",
        "user",
        body="LoadBody",
        response=_ref("LoadAnswer"),
        errors=(*_AUTH_ERRORS, 404, 409, 429, 503),
    ),
    Operation(
        "post",
        "/model/status",
        "The model's latest instance: state, reason, history",
        "user",
        body="ModelBody",
        response=_ref("InstanceStatus"),
        errors=(*_AUTH_ERRORS, 404),
    ),
    Operation(
        "post",
        "/model/run",
        "Run the model: JSON, or with stream=true raw text chunks (text/plain) or "
        "server-sent events (Accept: text/event-stream)",
        "user",
        body="RunBody",
        response=_ref("RunAnswer"),
        errors=(*_AUTH_ERRORS, 409, 429, 502, 503, 504),
    ),
    # The Bytez contract serves this one list on GET and POST alike.
    *(
        Operation(
            method,
            "/model/instances",
            "Every live instance",
            "user",
            response=_INSTANCE_LIST,
            errors=(401,),
        )
        for method in ("get", "post")
    ),
    Operation(
        "post",
        "/model/delete",
        "Stop the model's instance; answers its final status",
        "user",
        body="ModelBody",
        response=_ref("InstanceStatus"),
        errors=(*_AUTH_ERRORS, 404, 409),
    ),
    Operation(
        "get",
        "/capacity",
        "Devices: total, usable, reserved and observed free memory, and their instances",
        "admin",
        response={"type": "object"},
        errors=(401, 403),
    ),
    Operation(
        "get",
        "/model/logs",
        "The latest instance's log (?model=org/name&tail=N); admins and the loading key",
        "user",
        response={"type": "string"},
        errors=(401, 403, 404, 422),
        content_types=("text/plain",),
    ),
    Operation(
        "get",
        "/events",
        "Lifecycle events (server-sent events: `event: lifecycle`, `id`, JSON `data`); "
        "?tail=N, ?follow=0, Last-Event-ID replay; admins see all, users their own",
        "user",
        response={"type": "string"},
        errors=(400, 401),
        content_types=("text/event-stream",),
    ),
]
SCHEMAS["LoadBody"] = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": _MODEL_ID,
        "concurrency": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1},
        "expirationPeriodSeconds": {"type": "integer", "minimum": 1, "maximum": 2_592_000},
        "dryRun": {"type": "boolean", "description": "return the admission plan, do nothing"},
        "benchmark": {"type": "boolean", "description": "queue the benchmark, load when done"},
        "device": {
            "type": "string",
            "enum": ["auto", "cpu", "cuda"],
            "default": "auto",
            "description": "auto: a GPU where the host has one, else the host",
        },
        "engine": {
            "type": "string",
            "enum": ["transformers", "llama.cpp"],
            "description": "what generates text; default: llama.cpp for a GGUF file where "
            "installed, else transformers",
        },
    },
    "additionalProperties": False,
}
SCHEMAS["LoadAnswer"] = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "status": {"const": "started"},
        "concurrency": {"type": "integer"},
        "expirationPeriodSeconds": {"type": "integer"},
        "instanceStatus": {"type": "string"},
    },
}
SCHEMAS["RunBody"] = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        "model": _MODEL_ID,
        "prompt": {
            "oneOf": [
                {"type": "string", "minLength": 1, "maxLength": 200_000},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 256,
                    "description": "at most 200,000 characters of content in all",
                    "items": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"enum": ["system", "user", "assistant"]},
                            "content": {"type": "string"},
                        },
                        "additionalProperties": False,
                    },
                },
            ]
        },
        "params": _ref("GenerationParams"),
        "stream": {"type": "boolean", "default": False},
    },
    "additionalProperties": False,
}
SCHEMAS["RunAnswer"] = {
    "type": "object",
    "properties": {
        "output": {"type": "string"},
        "error": {"type": "null"},
        "tokens_generated": {"type": ["integer", "null"]},
        "time_seconds": {"type": ["number", "null"]},
        "tokens_per_second": {"type": ["number", "null"]},
    },
}

_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": 64}
SCHEMAS["GenerationParams"] = {
    "type": "object",
    "description": "each range-checked; max_new_tokens is capped per instance",
    "properties": {
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": 1024},
        "max_length": {"type": "integer", "minimum": 1, "maximum": 1024},
        "min_length": {"type": "integer", "minimum": 0, "maximum": 1024},
        "max_tokens": {
            "type": "integer",
            "minimum": 1,
            "maximum": 1024,
            "description": "max_new_tokens by its OpenAI name (not both)",
        },
        "temperature": {"type": "number", "minimum": 0, "maximum": 5, "description": "0: greedy"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0, "maximum": 1000},
        "do_sample": {"type": "boolean"},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        "stop": {"oneOf": [_STOP_STRING, {"type": "array", "items": _STOP_STRING, "maxItems": 4}]},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "raw": {"type": "boolean", "description": "continue the text, no chat template"},
    },
    "additionalProperties": False,
    "not": {"required": ["max_new_tokens", "max_tokens"]},
}

# Bodies that may be left out: an empty POST means "all defaults".
_OPTIONAL_BODIES = frozenset({"ModelListBody", "KeyCreate", "UploadUrlBody"})
SCHEMAS["ModelListBody"] = {
    "type": "object",
    "properties": {"task": {"type": ["string", "null"], "minLength": 1, "maxLength": 64}},
    "additionalProperties": False,
}
SCHEMAS["ModelJob"] = {
    "type": "object",
    "required": ["model", "success", "message", "startTime", "endTime", "modified"],
    "properties": {
        "model": {"type": "string"},
        "success": {"type": "boolean", "description": "false when the job failed"},
        "message": {
            "type": "string",
            "description": "'Model is already queued' while queued or benchmarking, "
            "'Model available' once measured, otherwise why the job failed",
        },
        "startTime": _TS,
        "endTime": _TS,
        "modified": _TS,
    },
}
SCHEMAS["KeyCreate"] = {
    "type": "object",
    "properties": {
        # Printable ASCII: stricter than the server (any printable text), never looser.
        "name": {"type": "string", "minLength": 1, "maxLength": 100, "pattern": "^[ -~]+$"},
        "scope": {"enum": ["admin", "user"]},
        **_LIMITS,
    },
    "additionalProperties": False,
}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary, "operationId": f"{op.method}_{op.path}"}
    if op.scope:
        out["security"] = [{"ApiKey": []}, {"Bearer": []}, {"XApiKey": []}]
        out["x-scope"] = op.scope
    else:
        out["security"] = []
    if op.body:
        out["requestBody"] = {
            "required": op.body not in _OPTIONAL_BODIES,
            "content": {op.body_media: {"schema": _ref(op.body)}},
        }
    if "{key_id}" in op.path:
        out["parameters"] = [
            {"name": "key_id", "in": "path", "required": True, "schema": {"type": "integer"}}
        ]
    if op.path == "/model/logs":
        out["parameters"] = [
            {"name": "model", "in": "query", "required": True, "schema": _MODEL_ID},
            {
                "name": "tail",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 5000, "default": 200},
            },
        ]
    if op.parameters:
        out["parameters"] = list(op.parameters)
    responses: dict[str, Any] = {
        str(op.ok_status): {
            "description": "OK",
            "content": {ct: {"schema": op.response} for ct in op.content_types},
        }
    }
    for status in sorted(set(op.errors)):
        responses[str(status)] = {
            "description": "Error",
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    out["responses"] = responses
    return out


@cache
def openapi_document() -> dict[str, Any]:
    # Their tables build on this module's.
    from control_plane import openapi_apis, openapi_async, openapi_openai

    paths: dict[str, dict[str, Any]] = {}
    tables = (
        OPERATIONS,
        openapi_async.OPERATIONS,
        openapi_openai.OPERATIONS,
        openapi_apis.OPERATIONS,
    )
    for op in [op for table in tables for op in table]:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mlcp",
            "version": "0.1.0",
            "description": "Model lifecycle control plane (Bytez v1 contract)",
        },
        "paths": paths,
        "components": {
            "schemas": {
                **SCHEMAS,
                **openapi_async.SCHEMAS,
                **openapi_openai.SCHEMAS,
                **openapi_apis.SCHEMAS,
            },
            "securitySchemes": {
                "ApiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "Authorization: Key <key>",
                },
                "Bearer": {"type": "http", "scheme": "bearer"},
                "XApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
