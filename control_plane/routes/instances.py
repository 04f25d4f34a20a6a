"""/model/load, /model/status, /model/run, /model/instances, /model/delete."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from control_plane import proxy
from control_plane.admission import admit, grow, plan_body
from control_plane.auth import Principal
from control_plane.errors import (
    BadGateway,
    Conflict,
    Invalid,
    NotFound,
    ServiceUnavailable,
)
from control_plane.handlers import authed, json_body
from control_plane.lifecycle import State
from control_plane.routes.jobs import request_model_job
from control_plane.schemas import (
    LoadRequest,
    parse_load_request,
    parse_model_request,
    parse_run_request,
    render_event,
    render_status,
)
from control_plane.state import AppState
from control_plane.supervisor import Route as InstanceRoute
from db import queries
from db.rows import InstanceRow, ModelRow

logger = logging.getLogger(__name__)

RUNNABLE_TASKS = ("text-generation",)
# A /model/run for a STARTING model waits this long by default for it to become RUNNING.
DEFAULT_COLD_WAIT_S = 5.0
MAX_COLD_WAIT_S = 120
STREAM_FAILED = "the model instance failed mid-stream"


def _status(state: AppState, row: InstanceRow) -> dict[str, Any]:
    pending, last_end = state.activity.pending(row.id)
    out = render_status(
        row,
        pending_inferences=pending,
        pending_last_end=last_end,
        in_flight=state.activity.in_flight(row.id),
    )
    out["metrics"] = {
        "inFlight": state.activity.in_flight(row.id),
        "queued": state.supervisor.queued.get(row.id, 0) if row.state == State.RUNNING else 0,
        "rejected": row.rejected + state.activity.pending_rejected(row.id),
        "evicted": (row.reason or "").startswith("evicted"),
    }
    return out


@authed("user")
async def load(request: Request, state: AppState, principal: Principal) -> Response:
    """Start an instance (or update the live one's concurrency and expiration)."""
    body = parse_load_request(await json_body(request, state), state.settings.default_expiration_s)
    model = await queries.get_model(state.pool, body.model)
    if model is None or not model.present:
        raise NotFound(f"model {body.model} is not in the catalog", code="model_not_found")
    if model.task not in RUNNABLE_TASKS:
        raise Invalid(
            f"model {body.model} is a {model.task} model; "
            "only text-generation models can be loaded",
            code="unsupported_task",
        )
    sup = state.supervisor
    if body.dry_run:
        current = await queries.latest_instance_for_model(state.pool, body.model)
        if current is not None and current.state in (State.STARTING, State.RUNNING):
            # Already placed: a repeated load only retunes it.
            return JSONResponse(
                {
                    "dryRun": True,
                    "model": body.model,
                    "decision": "loaded",
                    "device": current.device,
                    "requiredBytes": current.reserved_bytes,
                    "evictions": [],
                    "headroomBytes": None,
                }
            )
    else:
        current = await queries.latest_instance_for_model(state.pool, body.model)
        if current is not None and current.state in (State.STARTING, State.RUNNING):
            if body.concurrency > current.concurrency:
                await state.activity.flush(state.pool)
                evicted = await grow(
                    state.pool,
                    state.settings,
                    current,
                    model,
                    body.concurrency,
                    datetime.now(UTC),
                )
                # Their memory is free only once they are gone; then the batch may grow.
                await asyncio.gather(*(sup.finish_stopping(v) for v in evicted))
        live = await sup.update_live(body.model, body.concurrency, body.expiration_s)
        if live is not None:
            return _started(live)
    if body.benchmark and model.required_ram_bytes is None:
        return await _queue_load(state, model, body, principal)
    # This node's in-flight counts must be in the database before idleness is judged.
    await state.activity.flush(state.pool)
    admission = await admit(
        state.pool,
        state.settings,
        sup.runtime.name,
        model,
        body.concurrency,
        body.expiration_s,
        principal.key_id,
        datetime.now(UTC),
        dry_run=body.dry_run,
    )
    if body.dry_run:
        plan = plan_body(model.name, body.concurrency, admission.need_bytes, admission.decision)
        return JSONResponse({"dryRun": True, **plan})
    if admission.row is None:
        # Another request created the instance between our two statements: it is a repeat.
        live = await sup.update_live(body.model, body.concurrency, body.expiration_s)
        if live is None:
            raise ServiceUnavailable("the instance is changing state; retry", retry_after_s=1)
        return _started(live)
    sup.launch(admission.row, model, admission.evicted)
    return _started(admission.row)


def _started(row: InstanceRow) -> Response:
    return JSONResponse(
        {
            "model": row.model,
            "status": "started",
            "concurrency": row.concurrency,
            "expirationPeriodSeconds": row.expiration_s,
            "instanceStatus": row.state,
            "device": row.device,
            "reservedBytes": row.reserved_bytes,
        }
    )


async def _queue_load(
    state: AppState, model: ModelRow, body: LoadRequest, principal: Principal
) -> Response:
    """Request the model's benchmark and remember to load it once it is measured."""
    job = await request_model_job(state.pool, state.settings, model.name, datetime.now(UTC))
    if not job["success"]:
        raise Conflict(
            f"model {model.name} cannot be benchmarked: {job['message']}", code="benchmark_failed"
        )
    await queries.upsert_pending_load(
        state.pool, model.name, body.concurrency, body.expiration_s, principal.key_id
    )
    return JSONResponse(
        {
            "model": model.name,
            "status": "queued",
            "concurrency": body.concurrency,
            "expirationPeriodSeconds": body.expiration_s,
            "message": "Model is being benchmarked; it will load once available",
        },
        status_code=202,
    )


async def _latest(state: AppState, model: str) -> InstanceRow:
    row = await queries.latest_instance_for_model(state.pool, model)
    if row is None:
        raise NotFound(f"model {model} is not loaded", code="not_loaded")
    return row


@authed("user")
async def status(request: Request, state: AppState, principal: Principal) -> Response:
    """The model's latest instance, with why it is in its state and its history."""
    body = parse_model_request(await json_body(request, state))
    await state.activity.flush(state.pool)
    row = await _latest(state, body.model)
    out = _status(state, row)
    out["metrics"]["evictions"] = await queries.evictions_for_model(state.pool, row.model)
    if principal.is_admin:
        out["endpoint"] = row.endpoint
    out["history"] = [render_event(e) for e in await queries.instance_events(state.pool, row.id)]
    return JSONResponse(out)


@authed("user")
async def list_instances(request: Request, state: AppState, principal: Principal) -> Response:
    """Every live instance."""
    await state.activity.flush(state.pool)
    rows = await queries.live_instances(state.pool)
    return JSONResponse([_status(state, r) for r in rows])


@authed("user")
async def delete(request: Request, state: AppState, principal: Principal) -> Response:
    """Stop the model's instance; the answer is its final status."""
    body = parse_model_request(await json_body(request, state))
    row = await state.supervisor.delete(body.model)
    return JSONResponse(_status(state, row))


def cold_wait_s(prefer: str | None) -> float:
    """How long a request may wait for a STARTING model: `Prefer: wait=N` (RFC 7240), capped."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        value = value.strip()
        if name.strip().lower() == "wait" and value.isascii() and value.isdigit():
            # int() refuses over 4,300 digits (ValueError); anything that long means "the most".
            return float(
                min(int(value[:6]) if len(value) <= 6 else MAX_COLD_WAIT_S, MAX_COLD_WAIT_S)
            )
    return DEFAULT_COLD_WAIT_S


async def _route_or_error(state: AppState, model: str, wait_s: float = 0.0) -> InstanceRoute:
    route = state.supervisor.route(model)
    if route is not None:
        return route
    # Maybe started by another control plane since the last refresh.
    await state.supervisor.refresh_routes()
    route = state.supervisor.route(model)
    if route is not None:
        return route
    row = await queries.latest_instance_for_model(state.pool, model)
    if row is None or row.state == State.STOPPED:
        raise Conflict(f"model {model} is not loaded; POST /model/load first", code="not_loaded")
    if row.state == State.STARTING:
        route = await state.supervisor.wait_running(model, wait_s) if wait_s > 0 else None
        if route is not None:
            return route
        row = await queries.latest_instance_for_model(state.pool, model) or row
        if row.state == State.STARTING:
            raise ServiceUnavailable(
                f"model {model} is loading (STARTING); retry shortly, or send 'Prefer: wait=N'",
                code="loading",
                retry_after_s=2,
            )
        return await _route_or_error(state, model)
    if row.state == State.STOPPING:
        raise ServiceUnavailable(
            f"model {model} is stopping; load it again", code="stopping", retry_after_s=2
        )
    raise Conflict(f"model {model}'s instance failed: {row.reason}", code="instance_failed")


# The event loop keeps only weak references to tasks; these must outlive the request.
_failure_reports: set[asyncio.Task[Any]] = set()


def _report_failure(state: AppState, route: InstanceRoute) -> None:
    """Let the supervisor check the instance that failed a request, without making it wait."""
    task = asyncio.ensure_future(state.supervisor.instance_failed_during_request(route.instance_id))
    _failure_reports.add(task)
    task.add_done_callback(_failure_reports.discard)


class _CancelOnDisconnect:
    """Cancels the running task when the client disconnects inside the block; then says so.

    One watcher task per request. Running the upstream call as a second task and waiting on both
    with asyncio.wait cost 23 us per request against 12 us for this (uvloop, 2 cores here), and
    it is the shape asyncio.timeout() uses: cancel the task, then take the cancellation back.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._active = True
        self.disconnected = False

    def __enter__(self) -> _CancelOnDisconnect:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if self._active:
            self.disconnected = True
            self._task.cancel()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        self._active = False
        self._watcher.cancel()
        # Swallow only our own cancellation, never one asked for by someone else too.
        return (
            self.disconnected and self._task.uncancel() == 0 and exc_type is asyncio.CancelledError
        )


@authed("user")
async def run(request: Request, state: AppState, principal: Principal) -> Response:
    """Run the model: JSON, or a stream of text (or server-sent events)."""
    body = parse_run_request(await json_body(request, state))
    route = await _route_or_error(state, body.model, cold_wait_s(request.headers.get("prefer")))
    if body.stream:
        return await _stream(request, state, route, body.payload)
    state.activity.begin(route.instance_id)
    completed = False
    try:
        answer = None
        # The client left: cancelling closes the upstream connection, which stops generation.
        with _CancelOnDisconnect(request.receive) as guard:
            try:
                answer = await proxy.run(state.session, route.endpoint, body.payload)
            except proxy.InstanceGone:
                _report_failure(state, route)
                raise
            except ServiceUnavailable as exc:
                if exc.error_code == "instance_busy":
                    state.activity.reject(route.instance_id)
                raise
        if guard.disconnected:
            return Response(status_code=499)
        if not isinstance(answer, dict) or not isinstance(answer.get("output"), str):
            raise BadGateway("the model instance sent an invalid answer", code="instance_error")
        completed = True
        return JSONResponse(
            {
                "output": answer["output"],
                "error": None,
                "tokens_generated": answer.get("tokens_generated"),
                "time_seconds": answer.get("time_seconds"),
                "tokens_per_second": answer.get("tokens_per_second"),
            }
        )
    finally:
        state.activity.end(route.instance_id, completed=completed)


# What one agent read becomes: the text that arrived, and the last event when the stream ended.
Piece = tuple[str, dict[str, Any] | None]


async def _stream(
    request: Request, state: AppState, route: InstanceRoute, payload: dict[str, Any]
) -> Response:
    state.activity.begin(route.instance_id)
    try:
        resp = await proxy.open_stream(state.session, route.endpoint, payload)
    except BaseException as exc:
        state.activity.end(route.instance_id, completed=False)
        if isinstance(exc, proxy.InstanceGone):
            _report_failure(state, route)
        elif isinstance(exc, ServiceUnavailable) and exc.error_code == "instance_busy":
            state.activity.reject(route.instance_id)
        raise
    upstream = _Upstream(state, route, resp)
    if "text/event-stream" in request.headers.get("accept", ""):
        return _SseStream(upstream)
    return _TextStream(upstream)


class _Upstream:
    """An open agent stream and the request it serves: `finish` closes both, exactly once.

    The responses call it in a `finally` too, because a relay generator closed before its first
    step never runs its own `finally`, and the request would stay in flight (never reaped).
    """

    def __init__(self, state: AppState, route: InstanceRoute, resp: aiohttp.ClientResponse):
        self.state = state
        self.route = route
        self.resp = resp
        self._finished = False

    def finish(self, *, completed: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if completed:
            self.resp.release()
        else:
            self.resp.close()
        self.state.activity.end(self.route.instance_id, completed=completed)


async def relay(upstream: _Upstream) -> AsyncGenerator[Piece, None]:
    """A piece per agent read; the last one carries 'done' or an error. Finishes upstream."""
    completed = False
    try:
        async for batch in proxy.event_batches(upstream.resp):
            texts: list[str] = []
            for event in batch:
                if "text" in event:
                    texts.append(str(event["text"]))
                elif event.get("done"):
                    completed = True
                    yield "".join(texts), event
                    return
                elif "error" in event:
                    error = {"error": str(event["error"]), "code": str(event.get("code", "error"))}
                    yield "".join(texts), error
                    return
            if texts:
                yield "".join(texts), None
    except (aiohttp.ClientError, TimeoutError):
        pass
    finally:
        upstream.finish(completed=completed)
    # The agent ended the stream without 'done', or the connection broke: it died or hung.
    # Reported before the last piece is yielded: the consumer stops reading once it has it.
    _report_failure(upstream.state, upstream.route)
    yield "", {"error": STREAM_FAILED, "code": "instance_failed"}


class _TextStream(Response):
    """Raw text chunks, one per agent read; a failure ends the stream with a line saying so.

    Plain ASGI rather than StreamingResponse over two stacked generators: one generator step
    per chunk instead of two, one disconnect watcher instead of an anyio task group, and the
    generator is closed here rather than whenever it is collected.
    """

    media_type = "text/plain; charset=utf-8"

    def __init__(self, upstream: _Upstream) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers()
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with contextlib.aclosing(relay(self._upstream)) as pieces:
                with _CancelOnDisconnect(receive):
                    await self._relay(pieces, send)
        finally:
            self._upstream.finish(completed=False)

    async def _relay(self, pieces: AsyncIterator[Piece], send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for text, last in pieces:
            if last is not None and "error" in last:
                text += f"\n[error: {last['code']}] {last['error']}\n"
            elif last is None and not text:
                continue
            # The last piece ends the response in the same write.
            body = {"type": "http.response.body", "body": text.encode(), "more_body": last is None}
            await send(body)
            if last is not None:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _SseStream(EventSourceResponse):
    """Server-sent events: `data` per text chunk, then a `done` event with stats, or `error`."""

    def __init__(self, upstream: _Upstream) -> None:
        super().__init__(_as_sse(relay(upstream)))
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._upstream.finish(completed=False)


async def _as_sse(pieces: AsyncIterator[Piece]) -> AsyncIterator[dict[str, str]]:
    async for text, last in pieces:
        if text:
            yield {"data": text}
        if last is None:
            continue
        if last.get("done"):
            stats = {k: v for k, v in last.items() if k != "done"}
            yield {"event": "done", "data": json.dumps(stats)}
        else:
            yield {"event": "error", "data": json.dumps(last)}


routes = [
    Route("/model/load", load, methods=["POST"]),
    Route("/model/status", status, methods=["POST"]),
    Route("/model/run", run, methods=["POST"]),
    Route("/model/instances", list_instances, methods=["GET", "POST"]),
    Route("/model/delete", delete, methods=["POST"]),
]
