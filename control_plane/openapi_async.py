"""The OpenAPI entries of the async-request routes (/v1/async), merged into openapi.py's."""

from __future__ import annotations

from typing import Any

from control_plane.openapi import _MODEL_ID, _TS, Operation

# uuid.UUID() text: hypothesis ignores "format", the pattern makes generated ids real ones.
_UUID_PATTERN = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_MODEL = {"name": "model", "in": "path", "required": True, "schema": _MODEL_ID}
_URLS = {
    "type": "object",
    "properties": {"GET": {"type": "string"}, "cancel": {"type": "string"}},
}
_REF = {"$ref": "#/components/schemas/AsyncRequest"}

SCHEMAS: dict[str, dict[str, Any]] = {
    "UploadUrlBody": {"type": "object", "additionalProperties": False},
    "UploadUrl": {
        "type": "object",
        "required": ["uploadUrl", "id", "expiresAt", "maxBytes"],
        "properties": {
            "uploadUrl": {
                "type": "object",
                "required": ["PUT"],
                "properties": {"PUT": {"type": "string"}},
            },
            "id": {"type": "string"},
            "expiresAt": {"type": "string"},
            "maxBytes": {"type": "integer"},
        },
    },
    "UploadFile": {"type": "string", "format": "binary"},
    "UploadDone": {
        "type": "object",
        "required": ["id", "size_bytes", "status"],
        "properties": {
            "id": {"type": "string"},
            "size_bytes": {"type": "integer"},
            "status": {"const": "complete"},
        },
    },
    "AsyncSubmit": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": {
                "type": "object",
                "description": "text generation: {prompt, params}; speech recognition: Whisper "
                "options by name",
            },
            "URL": {"type": ["string", "null"], "description": "the upload URL (speech)"},
            "webhook": {
                "type": ["string", "null"],
                "maxLength": 2048,
                "description": "called on the filtered status changes; host in MLCP_WEBHOOK_ALLOW",
            },
            "webhook_events_filter": {
                "type": ["array", "null"],
                "minItems": 1,
                "items": {"enum": ["pending", "processing", "success", "failed", "cancelled"]},
            },
        },
        "additionalProperties": False,
    },
    "AsyncAccepted": {
        "type": "object",
        "properties": {
            "response": {
                "type": "object",
                "properties": {"id": {"type": "string"}, "urls": _URLS},
            }
        },
    },
    "AsyncRequest": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string"},
            "status": {
                "enum": ["accepted", "pending", "processing", "success", "failed", "cancelled"]
            },
            "result": {"type": ["object", "null"], "description": "{text} once success"},
            "error": {"type": ["string", "null"]},
            "reason": {"type": ["string", "null"], "description": "why it waits"},
            "attempts": {"type": "integer"},
            "timestamps": {
                "type": "object",
                "properties": {k: _TS for k in ("accepted", "pending", "processing", "finished")},
            },
            "urls": _URLS,
            "webhook": {
                "type": ["object", "null"],
                "properties": {
                    "url": {"type": "string"},
                    "events": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
    "WebhookDeliveries": {
        "type": "object",
        "required": ["deliveries"],
        "properties": {
            "deliveries": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "event": {"type": "string"},
                        "url": {"type": "string"},
                        "state": {"enum": ["pending", "delivered", "failed"]},
                        "attempts": {"type": "integer"},
                        "last_status": {"type": ["integer", "null"]},
                        "last_error": {"type": ["string", "null"]},
                        "created_at": _TS,
                        "delivered_at": _TS,
                        "next_attempt_at": _TS,
                    },
                },
            }
        },
    },
}

OPERATIONS = [
    Operation(
        "post",
        "/v1/input/upload-url",
        "A signed URL to PUT one file to (an async request's input)",
        "user",
        body="UploadUrlBody",
        response={"$ref": "#/components/schemas/UploadUrl"},
        errors=(400, 401, 413, 415, 422),
        ok_status=201,
        parameters=(
            {
                "name": "extension",
                "in": "query",
                "required": True,
                "schema": {"enum": ["wav", "flac", "mp3", "ogg"]},
            },
        ),
    ),
    Operation(
        "put",
        "/v1/input/uploads/{id}",
        "The file's bytes; the URL's signature is the credential (no key)",
        None,
        body="UploadFile",
        body_media="application/octet-stream",
        response={"$ref": "#/components/schemas/UploadDone"},
        errors=(400, 403, 409, 413, 415),
        parameters=(
            {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
            {
                "name": "expires",
                "in": "query",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            },
            {"name": "signature", "in": "query", "required": True, "schema": {"type": "string"}},
        ),
    ),
    Operation(
        "post",
        "/v1/async/{model}",
        "Submit an async request; 202 once it is stored",
        "user",
        body="AsyncSubmit",
        response={"$ref": "#/components/schemas/AsyncAccepted"},
        errors=(400, 401, 404, 409, 413, 415, 422, 429),
        ok_status=202,
        parameters=(_MODEL,),
    ),
    Operation(
        "get",
        "/v1/async/requests",
        "This key's async requests, newest first",
        "user",
        response={
            "type": "object",
            "properties": {
                "requests": {"type": "array", "items": _REF},
                "next": {"type": ["string", "null"]},
            },
        },
        errors=(401, 422),
        parameters=(
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            },
            {
                "name": "after",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "format": "uuid", "pattern": _UUID_PATTERN},
            },
        ),
    ),
    Operation(
        "get",
        "/v1/async/requests/{id}",
        "Poll an async request",
        "user",
        response=_REF,
        errors=(401, 404),
        parameters=(_ID,),
    ),
    Operation(
        "delete",
        "/v1/async/requests/{id}",
        "Cancel an async request",
        "user",
        response=_REF,
        errors=(401, 404, 409),
        parameters=(_ID,),
    ),
    Operation(
        "post",
        "/v1/async/requests/{id}/cancel",
        "Cancel an async request",
        "user",
        response=_REF,
        errors=(401, 404, 409),
        parameters=(_ID,),
    ),
    Operation(
        "get",
        "/v1/async/requests/{id}/webhooks",
        "The webhook deliveries of an async request",
        "user",
        response={"$ref": "#/components/schemas/WebhookDeliveries"},
        errors=(401, 404),
        parameters=(_ID,),
    ),
    Operation(
        "get",
        "/v1/webhooks/default/secret",
        "The secret this key's webhook deliveries are signed with",
        "user",
        response={
            "type": "object",
            "required": ["key"],
            "properties": {"key": {"type": "string", "pattern": "^whsec_"}},
        },
        errors=(401,),
    ),
]
