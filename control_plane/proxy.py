"""Forwarding a request to an instance agent, and reading its answer or its event stream.

The wire is `agent_http` (pooled keep-alive connections, httptools); this module turns the
agent's answers and errors into ours and its NDJSON stream into event batches.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from control_plane.agent_http import (
    AgentHttp,
    AgentHttpError,
    AgentResponse,
    BadAnswer,
)
from control_plane.errors import (
    GenerationFailed,
    HandlerBadOutput,
    HandlerError,
    HandlerTimeout,
    InstanceBusy,
    InstanceFailed,
    InstanceTimeout,
    Invalid,
    InvalidAnswer,
    InvalidParams,
    InvalidPrompt,
    Loading,
    MlcpError,
    PayloadTooLarge,
    UnsupportedTask,
)

logger = logging.getLogger(__name__)

# A whole non-streaming generation: the agent caps work per request (1024 new tokens), which is
# ~100 s at the 11 tokens/s measured for SmolLM2 on 2 cores; queueing may double it.
RUN_TIMEOUT_S = 600.0
# Streams have no total limit, only a limit on silence between chunks.
STREAM_IDLE_S = 300.0
JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"


class InstanceGone(InstanceFailed):
    """The model instance failed while serving the request."""


# The agent's error codes (instance_agent/protocol.py) that mean the same here; its messages are
# written for users. Any other error answer means the instance misbehaved.
AGENT_ERRORS: dict[str, type[MlcpError]] = {
    "invalid_prompt": InvalidPrompt,
    "invalid_params": InvalidParams,
    "invalid_request": Invalid,
    "invalid_json": Invalid,
    "payload_too_large": PayloadTooLarge,
    "instance_busy": InstanceBusy,
    "loading": Loading,
    "generation_failed": GenerationFailed,
    "wrong_task": UnsupportedTask,
    # /transcribe: the upload is not audio the instance can decode.
    "invalid_audio": Invalid,
    # /handle: the user's handler misbehaved (docs/handlers.md); its message says how.
    "handler_error": HandlerError,
    "handler_bad_output": HandlerBadOutput,
    "handler_timeout": HandlerTimeout,
    "grpc_only": UnsupportedTask,
}
# Codes whose 5xx statuses are the handler's doing, not the instance failing.
_HANDLER_CODES = frozenset({"handler_error", "handler_bad_output", "handler_timeout"})


class RawJson(bytes):
    """A JSON body already encoded: sent as is, as application/json (handler payloads)."""


def _agent_error(status: int, headers: Mapping[str, str], body: bytes) -> MlcpError:
    """Translate an agent's error answer into ours."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    message = answer.get("error") if isinstance(answer, dict) else None
    code = answer.get("code") if isinstance(answer, dict) else None
    known = isinstance(code, str) and (status < 500 or status == 503 or code in _HANDLER_CODES)
    cls = AGENT_ERRORS.get(str(code)) if known else None
    if cls is None or not isinstance(message, str):
        return InvalidAnswer("the model instance answered with an error")
    retry = headers.get("retry-after")
    valid = retry is not None and retry.isascii() and retry.isdigit() and len(retry) < 5
    retry_s = int(retry) if valid and retry is not None else None
    return cls(message, retry_after_s=retry_s)


def _encode(payload: dict[str, Any] | bytes) -> tuple[bytes, bytes]:
    """The body to send and its content type: bytes as they are, RawJson and dicts as JSON."""
    if isinstance(payload, RawJson):
        return bytes(payload), JSON
    if isinstance(payload, bytes):
        return payload, OCTET_STREAM
    return json.dumps(payload).encode(), JSON


async def _read_all(resp: AgentResponse) -> bytes:
    """The rest of the body; the connection goes back to the pool, or is closed on failure."""
    try:
        data = await resp.read()
    except BaseException:
        resp.close()
        raise
    resp.release()
    return data


async def run(
    http: AgentHttp,
    endpoint: str,
    payload: dict[str, Any] | bytes,
    path: str = "/run",
) -> Any:
    """POST `path` (/run) and return the agent's JSON answer; bytes go as the raw body."""
    body, content_type = _encode(payload)
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            resp = await http.post(endpoint, path, body, content_type)
            data = await _read_all(resp)
    except TimeoutError as exc:
        raise InstanceTimeout(
            f"the model instance did not answer within {RUN_TIMEOUT_S:.0f} s"
        ) from exc
    except BadAnswer as exc:
        raise InvalidAnswer("the model instance sent an invalid answer") from exc
    except AgentHttpError as exc:
        raise InstanceGone() from exc
    if resp.status != 200:
        raise _agent_error(resp.status, resp.headers, data)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise InvalidAnswer("the model instance sent an invalid answer") from exc


async def open_stream(
    http: AgentHttp, endpoint: str, payload: dict[str, Any], path: str = "/stream"
) -> AgentResponse:
    """POST `path` (/stream); return the open response once the agent accepted the request."""
    body, content_type = _encode(payload)
    try:
        async with asyncio.timeout(STREAM_IDLE_S):
            resp = await http.post(endpoint, path, body, content_type)
            if resp.status == 200:
                return resp
            data = await _read_all(resp)
    except TimeoutError as exc:
        raise InstanceTimeout("the model instance did not answer in time") from exc
    except BadAnswer as exc:
        raise InvalidAnswer("the model instance sent an invalid answer") from exc
    except AgentHttpError as exc:
        raise InstanceGone() from exc
    raise _agent_error(resp.status, resp.headers, data)


# A line longer than this is not an event our agent would send (they hold a few tokens).
MAX_EVENT_BYTES = 1 << 20
INVALID_STREAM = {"error": "the model instance sent an invalid stream", "code": InvalidAnswer.code}


def _parse_lines(lines: list[bytes]) -> tuple[list[dict[str, Any]], bool]:
    """The events in `lines`, and False when a line is not JSON (its events end there).

    All lines are parsed as one JSON array: 0.7 us a line against 6.8 us for a json.loads per
    line (200 token lines, here). A batch that does not parse whole is parsed line by line to
    keep the events before the bad line.
    """
    lines = [line for line in lines if line and not line.isspace()]
    if not lines:
        return [], True
    try:
        parsed = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        parsed = None
    if isinstance(parsed, list) and len(parsed) == len(lines):
        return [e for e in parsed if isinstance(e, dict)], True
    events: list[dict[str, Any]] = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            return events, False
        if isinstance(event, dict):
            events.append(event)
    return events, True


async def event_batches(resp: AgentResponse) -> AsyncIterator[list[dict[str, Any]]]:
    """The agent's NDJSON events, one list per read of whatever has arrived; ends at EOF.

    Batching per read, not per line, is what lets the relay send one chunk per read: a chunk per
    token cost the proxy most of its streaming throughput (0.6x of direct with 8 streams of 200
    fast tokens; benchmarks/bench_proxy.py). A line that is not JSON ends the batches with an
    error event; the caller checks for 'done'. A read that waits over STREAM_IDLE_S raises
    TimeoutError; a broken connection raises `agent_http.AgentHttpError`.
    """
    tail = b""
    while True:
        data = await resp.readany(STREAM_IDLE_S)
        if not data:
            break
        if tail:
            data = tail + data
        lines = data.split(b"\n")
        tail = lines.pop()
        events, ok = _parse_lines(lines)
        if not ok or len(tail) > MAX_EVENT_BYTES:
            yield [*events, dict(INVALID_STREAM)]
            return
        if events:
            yield events
    events, ok = _parse_lines([tail])
    if not ok:
        events.append(dict(INVALID_STREAM))
    if events:
        yield events
