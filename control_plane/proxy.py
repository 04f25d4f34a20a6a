"""Forwarding /model/run to an instance agent over a shared aiohttp session.

aiohttp, not httpx: a proxy on httpx's AsyncClient kept 0.03x of direct throughput at 8
concurrent requests here, aiohttp 0.9x (measured when the proxy was written; bench_proxy.py
keeps the figure). Connections to each agent are reused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

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

CONNECT_TIMEOUT_S = 2.0
# A whole non-streaming generation: the agent caps work per request (1024 new tokens), which is
# ~100 s at the 11 tokens/s measured for SmolLM2 on 2 cores; queueing may double it.
RUN_TIMEOUT_S = 600.0
# Streams have no total limit, only a limit on silence between chunks.
STREAM_IDLE_S = 300.0

RUN_TIMEOUT = aiohttp.ClientTimeout(total=RUN_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S)
STREAM_TIMEOUT = aiohttp.ClientTimeout(
    total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=STREAM_IDLE_S
)


class InstanceGone(InstanceFailed):
    """The model instance failed while serving the request."""


# Below uvicorn's 5 s keep-alive in the agent, so the agent never closes a pooled connection just
# as a request is sent on it: with 30 s, 2 of 24 requests sent ~5 s after the previous one failed
# (ServerDisconnectedError, ClientOSError: a 502 as if the instance had died); with 4 s, 0 of 24.
KEEPALIVE_S = 4.0


def new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        json_serialize=json.dumps,
        skip_auto_headers=("User-Agent",),
    )


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


async def _agent_error(resp: aiohttp.ClientResponse) -> MlcpError:
    """Translate an agent's error answer into ours."""
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    code = body.get("code") if isinstance(body, dict) else None
    known = isinstance(code, str) and (
        resp.status < 500 or resp.status == 503 or code in _HANDLER_CODES
    )
    cls = AGENT_ERRORS.get(str(code)) if known else None
    if cls is None or not isinstance(message, str):
        return InvalidAnswer("the model instance answered with an error")
    retry = resp.headers.get("Retry-After")
    valid = retry is not None and retry.isascii() and retry.isdigit() and len(retry) < 5
    retry_s = int(retry) if valid and retry is not None else None
    return cls(message, retry_after_s=retry_s)


async def run(
    session: aiohttp.ClientSession,
    endpoint: str,
    payload: dict[str, Any] | bytes,
    path: str = "/run",
) -> Any:
    """POST `path` (/run) and return the agent's JSON answer; bytes go as the raw body."""
    body: dict[str, Any]
    if isinstance(payload, RawJson):
        body = {"data": bytes(payload), "headers": {"Content-Type": "application/json"}}
    elif isinstance(payload, bytes):
        body = {"data": payload, "headers": {"Content-Type": "application/octet-stream"}}
    else:
        body = {"json": payload}
    try:
        async with session.post(endpoint + path, **body, timeout=RUN_TIMEOUT) as resp:
            if resp.status != 200:
                raise await _agent_error(resp)
            return await resp.json(content_type=None)
    except TimeoutError as exc:
        raise InstanceTimeout(
            f"the model instance did not answer within {RUN_TIMEOUT_S:.0f} s"
        ) from exc
    except aiohttp.ClientConnectionError as exc:
        raise InstanceGone() from exc
    except (aiohttp.ClientError, ValueError) as exc:
        raise InvalidAnswer("the model instance sent an invalid answer") from exc


async def open_stream(
    session: aiohttp.ClientSession, endpoint: str, payload: dict[str, Any], path: str = "/stream"
) -> aiohttp.ClientResponse:
    """POST `path` (/stream); return the open response once the agent accepted the request."""
    try:
        resp = await session.post(endpoint + path, json=payload, timeout=STREAM_TIMEOUT)
    except TimeoutError as exc:
        raise InstanceTimeout("the model instance did not answer in time") from exc
    except aiohttp.ClientError as exc:
        raise InstanceGone() from exc
    if resp.status != 200:
        try:
            raise await _agent_error(resp)
        finally:
            resp.release()
    return resp


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


async def event_batches(resp: aiohttp.ClientResponse) -> AsyncIterator[list[dict[str, Any]]]:
    """The agent's NDJSON events, one list per read of whatever has arrived; ends at EOF.

    Batching per read, not per line, is what lets the relay send one chunk per read: a chunk per
    token cost the proxy most of its streaming throughput (0.6x of direct with 8 streams of 200
    fast tokens; benchmarks/bench_proxy.py). A line that is not JSON ends the batches with an
    error event; the caller checks for 'done'.
    """
    content = resp.content
    tail = b""
    while True:
        data = await content.readany()
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
