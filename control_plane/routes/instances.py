"""/model/load, /model/status, /model/run, /model/instances, /model/delete."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from control_plane import proxy
from control_plane.auth import Principal
from control_plane.errors import (
    BadGateway,
    Conflict,
    Invalid,
    MlcpError,
    NotFound,
    ServiceUnavailable,
)
from control_plane.handlers import authed, json_body
from control_plane.lifecycle import State
from control_plane.schemas import (
    parse_load_request,
    parse_model_request,
    parse_run_request,
    render_event,
    render_status,
)
from control_plane.state import AppState
from control_plane.supervisor import Route as InstanceRoute
from db import queries
from db.rows import InstanceRow

logger = logging.getLogger(__name__)

RUNNABLE_TASKS = ("text-generation",)
STREAM_FAILED = "the model instance failed mid-stream"


def _status(state: AppState, row: InstanceRow) -> dict[str, Any]:
    pending, last_end = state.activity.pending(row.id)
    return render_status(
        row,
        pending_inferences=pending,
        pending_last_end=last_end,
        in_flight=state.activity.in_flight(row.id),
    )


@authed("user")
async def load(request: Request, state: AppState, principal: Principal) -> Response:
    """Start an instance (or update the live one's concurrency and expiration)."""
    body = parse_load_request(await json_body(request, state), state.settings.default_expiration_s)
    model = await queries.get_model(state.pool, body.model)
    if model is None or not model.present:
        raise NotFound(f"model {body.model} is not in the catalog", code="model_not_found")
    if model.task not in RUNNABLE_TASKS:
        raise Invalid(
            f"model {body.model} is a {model.task} model; only text-generation models can be loaded",
            code="unsupported_task",
        )
    row = await state.supervisor.load(model, body.concurrency, body.expiration_s, principal.key_id)
    return JSONResponse(
        {
            "model": row.model,
            "status": "started",
            "concurrency": row.concurrency,
            "expirationPeriodSeconds": row.expiration_s,
            "instanceStatus": row.state,
        }
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
    row = await _latest(state, body.model)
    out = _status(state, row)
    if principal.is_admin:
        out["endpoint"] = row.endpoint
    out["history"] = [render_event(e) for e in await queries.instance_events(state.pool, row.id)]
    return JSONResponse(out)


@authed("user")
async def list_instances(request: Request, state: AppState, principal: Principal) -> Response:
    """Every live instance."""
    rows = await queries.live_instances(state.pool)
    return JSONResponse([_status(state, r) for r in rows])


@authed("user")
async def delete(request: Request, state: AppState, principal: Principal) -> Response:
    """Stop the model's instance; the answer is its final status."""
    body = parse_model_request(await json_body(request, state))
    row = await state.supervisor.delete(body.model)
    return JSONResponse(_status(state, row))


async def _route_or_error(state: AppState, model: str) -> InstanceRoute:
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
        raise Conflict(
            f"model {model} is not loaded; POST /model/load first", code="not_loaded"
        )
    if row.state == State.STARTING:
        raise ServiceUnavailable(
            f"model {model} is loading; retry shortly", code="loading", retry_after_s=2
        )
    if row.state == State.STOPPING:
        raise ServiceUnavailable(
            f"model {model} is stopping; load it again", code="stopping", retry_after_s=2
        )
    raise Conflict(f"model {model}'s instance failed: {row.reason}", code="instance_failed")


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@authed("user")
async def run(request: Request, state: AppState, principal: Principal) -> Response:
    """Run the model: JSON, or a stream of text (or server-sent events)."""
    body = parse_run_request(await json_body(request, state))
    route = await _route_or_error(state, body.model)
    if body.stream:
        return await _stream(request, state, route, body.payload)
    state.activity.begin(route.instance_id)
    completed = False
    upstream = asyncio.ensure_future(proxy.run(state.session, route.endpoint, body.payload))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((upstream, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not upstream.done():
            # The client left: cancelling closes the upstream connection, which stops generation.
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError, MlcpError):
                await upstream
            return Response(status_code=499)
        try:
            answer = upstream.result()
        except proxy.InstanceGone:
            asyncio.ensure_future(state.supervisor.instance_failed_during_request(route.instance_id))
            raise
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
        watcher.cancel()
        state.activity.end(route.instance_id, completed=completed)


async def _stream(
    request: Request, state: AppState, route: InstanceRoute, payload: dict[str, Any]
) -> Response:
    state.activity.begin(route.instance_id)
    try:
        upstream = await proxy.open_stream(state.session, route.endpoint, payload)
    except BaseException as exc:
        state.activity.end(route.instance_id, completed=False)
        if isinstance(exc, proxy.InstanceGone):
            asyncio.ensure_future(state.supervisor.instance_failed_during_request(route.instance_id))
        raise
    sse = "text/event-stream" in request.headers.get("accept", "")

    async def relay() -> AsyncIterator[dict[str, Any]]:
        """Agent events, ending with a 'done' or an 'error' event; closes upstream always."""
        completed = False
        try:
            async for event in proxy.events(upstream):
                if "text" in event:
                    yield event
                elif event.get("done"):
                    completed = True
                    yield event
                    return
                elif "error" in event:
                    yield {"error": str(event["error"]), "code": str(event.get("code", "error"))}
                    return
            yield {"error": STREAM_FAILED, "code": "instance_failed"}
            asyncio.ensure_future(state.supervisor.instance_failed_during_request(route.instance_id))
        except (aiohttp.ClientError, TimeoutError):
            yield {"error": STREAM_FAILED, "code": "instance_failed"}
            asyncio.ensure_future(state.supervisor.instance_failed_during_request(route.instance_id))
        finally:
            if completed:
                upstream.release()
            else:
                upstream.close()
            state.activity.end(route.instance_id, completed=completed)

    if sse:
        return EventSourceResponse(_as_sse(relay()))
    return StreamingResponse(_as_text(relay()), media_type="text/plain; charset=utf-8")


async def _as_text(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Raw text chunks; a failure ends the stream with a last line saying so."""
    async for event in events:
        if "text" in event:
            yield str(event["text"])
        elif "error" in event:
            yield f"\n[error: {event['code']}] {event['error']}\n"


async def _as_sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, str]]:
    """Server-sent events: `data` per text chunk, then a `done` event with stats, or `error`."""
    async for event in events:
        if "text" in event:
            yield {"data": str(event["text"])}
        elif event.get("done"):
            stats = {k: v for k, v in event.items() if k != "done"}
            yield {"event": "done", "data": json.dumps(stats)}
        else:
            yield {"event": "error", "data": json.dumps(event)}


routes = [
    Route("/model/load", load, methods=["POST"]),
    Route("/model/status", status, methods=["POST"]),
    Route("/model/run", run, methods=["POST"]),
    Route("/model/instances", list_instances, methods=["GET", "POST"]),
    Route("/model/delete", delete, methods=["POST"]),
]
