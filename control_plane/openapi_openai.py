"""The OpenAPI entries of the OpenAI-compatible routes (/v1) and /chat, merged into openapi.py's.

Every schema here is as strict as the server's checks (control_plane/openai_schemas.py,
instance_agent/chat.py) or stricter, so a request the document calls valid is never refused.
"""

from __future__ import annotations

from typing import Any

from control_plane.openapi import _MODEL_ID, Operation

# A string with some text in it: the server refuses prompts that are only whitespace.
_TEXT = {"type": "string", "minLength": 1, "maxLength": 2000, "pattern": r"\S"}
_STOP = {"type": "string", "minLength": 1, "maxLength": 64}
_SAMPLING: dict[str, Any] = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2, "description": "0: greedy"},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    "stop": {"oneOf": [_STOP, {"type": "array", "items": _STOP, "minItems": 1, "maxItems": 4}]},
    "n": {"const": 1, "description": "one choice per request"},
    "presence_penalty": {"const": 0},
    "frequency_penalty": {"const": 0},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "additionalProperties": False,
        "description": "only with stream: true",
    },
    "user": {"type": "string", "maxLength": 256},
}
_NO_STREAM_OPTIONS_ALONE = {
    "not": {"required": ["stream_options"], "properties": {"stream": {"const": False}}}
}
_USAGE = {
    "type": "object",
    "properties": {
        k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "ChatCompletionBody": {
        "type": "object",
        "required": ["model", "messages", "stream"],
        "properties": {
            "model": _MODEL_ID,
            "messages": {
                "type": "array",
                "minItems": 1,
                "maxItems": 16,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"enum": ["system", "user", "assistant"]},
                        "content": _TEXT,
                        "name": {"type": "string", "maxLength": 64},
                    },
                    "additionalProperties": False,
                },
            },
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1024},
            "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 1024},
            **_SAMPLING,
        },
        "additionalProperties": False,
        **_NO_STREAM_OPTIONS_ALONE,
    },
    "CompletionBody": {
        "type": "object",
        "required": ["model", "prompt", "stream"],
        "properties": {
            "model": _MODEL_ID,
            "prompt": _TEXT,
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 1024},
            **_SAMPLING,
        },
        "additionalProperties": False,
        **_NO_STREAM_OPTIONS_ALONE,
    },
    "EmbeddingBody": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": _MODEL_ID,
            "input": {
                "oneOf": [
                    {"type": "string", "minLength": 1, "maxLength": 2000},
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 64,
                        "items": {"type": "string", "minLength": 1, "maxLength": 2000},
                    },
                ]
            },
            "encoding_format": {"enum": ["float", "base64"]},
            "user": {"type": "string", "maxLength": 256},
        },
        "additionalProperties": False,
    },
    "ChatBody": {
        "type": "object",
        "required": ["model", "prompt"],
        "description": "model may be left out when MLCP_DEFAULT_MODEL is set or one model runs",
        "properties": {
            "model": _MODEL_ID,
            "prompt": _TEXT,
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 2048, "default": 128},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 0},
        },
        "additionalProperties": False,
    },
    "OpenAICompletion": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"enum": ["chat.completion", "text_completion"]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": _USAGE,
        },
        "description": "or, with stream: true, server-sent events ending with data: [DONE]",
    },
    "OpenAIEmbeddings": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object"}},
            "model": {"type": "string"},
            "usage": _USAGE,
        },
    },
    "ChatAnswer": {
        "type": "object",
        "required": ["prompt", "response", "tokens_generated", "time_seconds", "tokens_per_second"],
        "properties": {
            "prompt": {"type": "string"},
            "response": {"type": "string"},
            "tokens_generated": {"type": "integer"},
            "time_seconds": {"type": "number"},
            "tokens_per_second": {"type": "number"},
        },
    },
}

_ERRORS = (400, 401, 403, 404, 409, 413, 415, 422, 429, 502, 503, 504)
_COMPLETION = {"$ref": "#/components/schemas/OpenAICompletion"}

OPERATIONS = [
    Operation(
        "get",
        "/v1/models",
        "Benchmarked models, in OpenAI's list shape with mlcp's fields",
        "user",
        response={"type": "object", "properties": {"object": {"const": "list"}, "data": {}}},
        errors=(401,),
    ),
    Operation(
        "post",
        "/v1/chat/completions",
        "OpenAI chat completions; loads the model on demand",
        "user",
        body="ChatCompletionBody",
        response=_COMPLETION,
        errors=_ERRORS,
        content_types=("application/json", "text/event-stream"),
    ),
    Operation(
        "post",
        "/v1/completions",
        "OpenAI text completions; loads the model on demand",
        "user",
        body="CompletionBody",
        response=_COMPLETION,
        errors=_ERRORS,
        content_types=("application/json", "text/event-stream"),
    ),
    Operation(
        "post",
        "/v1/embeddings",
        "OpenAI embeddings from a feature-extraction model; loads it on demand",
        "user",
        body="EmbeddingBody",
        response={"$ref": "#/components/schemas/OpenAIEmbeddings"},
        errors=_ERRORS,
    ),
    Operation(
        "post",
        "/chat",
        "The single-model server's /chat, for a model of the catalog",
        "user",
        body="ChatBody",
        response={"$ref": "#/components/schemas/ChatAnswer"},
        errors=_ERRORS,
    ),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics of this control plane (admin or metrics-scope keys)",
        "metrics",
        response={"type": "string"},
        errors=(401, 403),
        content_types=("text/plain",),
    ),
]
