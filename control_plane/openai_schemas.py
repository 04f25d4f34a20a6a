"""OpenAI-compatible request and response bodies: parsed into agent payloads, rendered back.

Parsing turns `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings` bodies into what
the instance agent takes (`{"prompt", "params"}` or `{"input"}`); rendering builds OpenAI's
`chat.completion`, `chat.completion.chunk`, `text_completion` and `list` objects and the error
envelope `{"error": {"message", "type", "param", "code"}}`. Parameters OpenAI has and the agent
cannot honour (`n` > 1, `logprobs`, tools, non-zero penalties) are refused with a 422 naming
them, never silently ignored.
"""

from __future__ import annotations

import base64
import math
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Any

from benchmarker.model_ids import model_id_problem
from control_plane.errors import InvalidBody, InvalidField, MlcpError, UnknownField
from instance_agent.embeddings import MAX_EMBED_INPUTS, validate_embed_input
from instance_agent.protocol import (
    CHAT_ROLES,
    DEFAULT_MAX_NEW_TOKENS_CAP,
    MAX_MESSAGES,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ProtocolError,
)

# Fields clients send that change nothing here (bookkeeping for OpenAI's own platform).
_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
_SAMPLING = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")
_CHAT_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options"}
    | {"n", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format"}
    | set(_SAMPLING)
    | _IGNORED
)
_COMPLETION_FIELDS = frozenset(
    {"model", "prompt", "max_tokens", "stream", "stream_options", "n", "logprobs", "echo"}
    | {"suffix", "best_of"}
    | set(_SAMPLING)
    | _IGNORED
)
_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
# OpenAI's own default for a completion without max_tokens is "up to the context"; the agent
# bounds every answer, and 16 is OpenAI's documented default for legacy completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class OpenAIInvalid(InvalidField):
    """A field of the request is invalid."""

    def __init__(self, message: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(exc: MlcpError) -> dict[str, Any]:
    """OpenAI's error envelope for an mlcp error (same status code as everywhere in mlcp)."""
    kind = _TYPE_BY_STATUS.get(exc.status_code, "server_error")
    param = exc.param if isinstance(exc, OpenAIInvalid) else None
    return {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.code}}


@dataclass(frozen=True)
class Generation:
    """A parsed chat or completion request: what to send the agent and how to answer."""

    model: str
    payload: dict[str, Any]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    payload: dict[str, Any]
    base64: bool


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _object(body: object, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidBody(f"the request body must be a JSON object, not {_kind(body)}")
    for key in body:
        if key not in allowed:
            raise UnknownField(f"unknown field {key!r}")
    return body


def _model(body: dict[str, Any]) -> str:
    value = body.get("model")
    if not isinstance(value, str):
        raise OpenAIInvalid("model is required: a model id such as org/name", "model")
    problem = model_id_problem(value)
    if problem is not None:
        raise OpenAIInvalid(problem, "model")
    return value


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # JSON has one number type: 207.0 is the integer 207 (as on /model/run).
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpenAIInvalid(f"{name} must be an integer, not {_kind(value)}", name)
    if not low <= value <= high:
        raise OpenAIInvalid(f"{name} must be between {low} and {high}, not {value}", name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OpenAIInvalid(f"{name} must be a number, not {_kind(value)}", name)
    if not math.isfinite(value) or not low <= value <= high:
        raise OpenAIInvalid(f"{name} must be a finite number from {low:g} to {high:g}", name)
    return float(value)


def _refuse_unless(body: dict[str, Any], name: str, ok: tuple[object, ...], why: str) -> None:
    value = body.get(name)
    if value is not None and not any(
        value is v or (value == v and type(value) is type(v)) for v in ok
    ):
        raise OpenAIInvalid(f"{name} is not supported: {why}", name)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise OpenAIInvalid(f"stream must be true or false, not {_kind(stream)}", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise OpenAIInvalid("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise OpenAIInvalid('stream_options must be {"include_usage": bool}', "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise OpenAIInvalid("include_usage must be true or false", "stream_options")
    return stream, usage


def _stop(body: dict[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise OpenAIInvalid("stop must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP_STRINGS:
        raise OpenAIInvalid(f"stop may hold at most {MAX_STOP_STRINGS} strings", "stop")
    if not all(1 <= len(s) <= MAX_STOP_CHARS for s in items):
        raise OpenAIInvalid(f"each stop string must be 1 to {MAX_STOP_CHARS} characters", "stop")
    return items


def _params(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """The agent's generation parameters for OpenAI's sampling fields."""
    _refuse_unless(body, "n", (1,), "only one choice per request (n: 1)")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0) not in (None, 0.0):
            raise OpenAIInvalid(
                f"{name} is not supported except 0; use repetition_penalty on /model/run", name
            )
    # OpenAI samples at temperature 1 unless told otherwise; 0 is greedy.
    temperature = _number(body, "temperature", 0.0, 2.0)
    temperature = 1.0 if temperature is None else temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _int(body, "seed", 0, 2**63 - 1)
    stop = _stop(body)
    params: dict[str, Any] = {}
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    if temperature > 0:
        params["do_sample"] = True
        params["temperature"] = temperature
        if top_p is not None and top_p > 0:
            params["top_p"] = top_p
    else:
        params["temperature"] = 0
    if seed is not None:
        params["seed"] = seed
    if stop:
        params["stop"] = stop
    return params


def _max_tokens(body: dict[str, Any], *names: str) -> int | None:
    values = [v for v in (_int(body, n, 1, DEFAULT_MAX_NEW_TOKENS_CAP) for n in names) if v]
    return min(values) if values else None


def _content(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts: list[str] = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise OpenAIInvalid(
                    f"{where}[{index}] is a content part of type {kind!r}; only text parts "
                    "are supported",
                    where,
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise OpenAIInvalid(f"{where}[{index}].text must be a string", where)
            parts.append(text)
        return "".join(parts)
    raise OpenAIInvalid(f"{where} must be a string or a list of text parts", where)


def _messages(value: object) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise OpenAIInvalid(f"messages must be a list, not {_kind(value)}", "messages")
    if not 1 <= len(value) <= MAX_MESSAGES:
        raise OpenAIInvalid(f"messages must hold 1 to {MAX_MESSAGES} messages", "messages")
    out: list[dict[str, str]] = []
    total = 0
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise OpenAIInvalid(f"{where} must be an object", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise OpenAIInvalid(f"{where}.role must be one of system, user, assistant", where)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise OpenAIInvalid(f"{where} has unsupported field {sorted(extra)[0]!r}", where)
        content = _content(message.get("content"), f"{where}.content")
        total += len(content)
        out.append({"role": role, "content": content})
    if total > MAX_PROMPT_CHARS:
        raise OpenAIInvalid(
            f"the messages may hold at most {MAX_PROMPT_CHARS} characters", "messages"
        )
    if not any(m["content"].strip() for m in out):
        raise OpenAIInvalid("the messages are all empty", "messages")
    return out


def parse_chat(body: object) -> Generation:
    """A `/v1/chat/completions` body; raises an `MlcpError` naming the offending field."""
    obj = _object(body, _CHAT_FIELDS)
    model = _model(obj)
    messages = _messages(obj.get("messages"))
    _refuse_unless(obj, "logprobs", (False,), "log probabilities are not computed")
    _refuse_unless(obj, "top_logprobs", (0,), "log probabilities are not computed")
    for name in ("tools", "tool_choice"):
        if obj.get(name) not in (None, [], "none"):
            raise OpenAIInvalid(f"{name} is not supported: no tool calling", name)
    fmt = obj.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise OpenAIInvalid("response_format is not supported except type text", "response_format")
    stream, usage = _stream(obj)
    params = _params(obj, _max_tokens(obj, "max_tokens", "max_completion_tokens"))
    return Generation(model, {"prompt": messages, "params": params}, stream, usage)


def parse_completion(body: object) -> Generation:
    """A `/v1/completions` body: plain continuation of the prompt (no chat template)."""
    obj = _object(body, _COMPLETION_FIELDS)
    model = _model(obj)
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIInvalid("prompt must be a string (one prompt per request)", "prompt")
    if not 1 <= len(prompt) <= MAX_PROMPT_CHARS:
        raise OpenAIInvalid(f"prompt must be 1 to {MAX_PROMPT_CHARS} characters long", "prompt")
    _refuse_unless(obj, "logprobs", (0,), "log probabilities are not computed")
    _refuse_unless(obj, "echo", (False,), "the prompt is not echoed")
    _refuse_unless(obj, "best_of", (1,), "only one candidate is generated")
    if obj.get("suffix") not in (None, ""):
        raise OpenAIInvalid("suffix is not supported: no insertion", "suffix")
    stream, usage = _stream(obj)
    max_tokens = _max_tokens(obj, "max_tokens") or COMPLETIONS_DEFAULT_MAX_TOKENS
    params = _params(obj, max_tokens)
    params["raw"] = True
    return Generation(model, {"prompt": prompt, "params": params}, stream, usage)


def parse_embeddings(body: object) -> EmbeddingRequest:
    """A `/v1/embeddings` body."""
    obj = _object(body, _EMBEDDING_FIELDS)
    model = _model(obj)
    try:
        texts = validate_embed_input(obj.get("input"))
    except ProtocolError as exc:
        raise OpenAIInvalid(exc.message, "input") from exc
    fmt = obj.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise OpenAIInvalid("encoding_format must be float or base64", "encoding_format")
    if obj.get("dimensions") is not None:
        raise OpenAIInvalid(
            "dimensions is not supported: vectors keep the model's size", "dimensions"
        )
    assert len(texts) <= MAX_EMBED_INPUTS
    return EmbeddingRequest(model, {"input": texts}, fmt == "base64")


# -- rendering ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """An id in OpenAI's style, e.g. `chatcmpl-3f2a...`."""
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish(answer: dict[str, Any]) -> str:
    reason = answer.get("finish_reason")
    return reason if reason in ("stop", "length") else "stop"


def render_chat(model: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A `chat.completion` from the agent's /run answer."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer["output"]},
                "logprobs": None,
                "finish_reason": _finish(answer),
            }
        ],
        "usage": usage(int(answer.get("prompt_tokens", 0)), int(answer.get("tokens_generated", 0))),
    }


def render_completion(model: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A `text_completion` from the agent's /run answer."""
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": answer["output"],
                "logprobs": None,
                "finish_reason": _finish(answer),
            }
        ],
        "usage": usage(int(answer.get("prompt_tokens", 0)), int(answer.get("tokens_generated", 0))),
    }


def render_embeddings(request: EmbeddingRequest, answer: dict[str, Any]) -> dict[str, Any]:
    """A `list` of `embedding` objects from the agent's /embed answer."""
    vectors = answer["embeddings"]
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = vector
        if request.base64:
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = int(answer.get("prompt_tokens", 0))
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
