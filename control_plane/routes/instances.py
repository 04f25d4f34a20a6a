"""/model/load, /model/status, /model/run, /model/instances, /model/delete: parse, call, render.

Loads go through control_plane/loading.py, runs through control_plane/relay.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import proxy, relay
from control_plane.auth import Principal
from control_plane.errors import InvalidAnswer, InvalidPrompt, ModelNotFound, NotLoaded
from control_plane.handlers import authed, json_body
from control_plane.lifecycle import State
from control_plane.loading import cold_wait_s, load, not_loaded, route_to
from control_plane.metrics import MODEL_SCOPE_KEY
from control_plane.routes import api_calls
from control_plane.schemas import (
    MODEL,
    PROMPT,
    parse_load_request,
    parse_model_field,
    parse_model_request,
    parse_run_request,
    reject_unknown,
    render_event,
    render_status,
)
from control_plane.state import AppState
from db import queries
from db.rows import InstanceRow

# `/model/run`'s payload for a handler model (a deployed API): any JSON value.
INPUT = "input"


def _status(state: AppState, row: InstanceRow) -> dict[str, Any]:
    out = render_status(
        row,
        pending_inferences=state.activity.pending(row.id),
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
async def load_model(request: Request, state: AppState, principal: Principal) -> Response:
    """Start an instance (or update the live one's concurrency and expiration)."""
    body = parse_load_request(await json_body(request, state), state.settings.default_expiration_s)
    outcome = await load(
        state,
        body,
        principal.key_id,
        may_retune_others=principal.is_admin,
        max_instances=state.limiter.limits_of(principal).max_instances,
    )
    if outcome.plan is not None:
        return JSONResponse(outcome.plan)
    if outcome.row is None:
        return JSONResponse(
            {
                "model": body.model,
                "status": "queued",
                "concurrency": body.concurrency,
                "expirationPeriodSeconds": body.expiration_s,
                "message": "Model is being benchmarked; it will load once available",
            },
            status_code=202,
        )
    row = outcome.row
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


async def _latest(state: AppState, model: str) -> InstanceRow:
    row = await queries.latest_instance_for_model(state.pool, model)
    if row is None:
        raise await not_loaded(state, model)
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
    """Live instances: all for admins; for users their own and the shared RUNNING ones."""
    await state.activity.flush(state.pool)
    rows = await queries.live_instances(state.pool)
    if not principal.is_admin:
        rows = [r for r in rows if may_manage(principal, r) or r.state == State.RUNNING]
    return JSONResponse([_status(state, r) for r in rows])


def may_manage(principal: Principal, row: InstanceRow) -> bool:
    """Only the key that loaded an instance, or an admin, may stop, retune or read its logs."""
    return principal.is_admin or row.owner_key_id == principal.key_id


def not_yours(model: str) -> NotLoaded:
    return NotLoaded(f"model {model} has no instance loaded by this key")


@authed("user")
async def delete(request: Request, state: AppState, principal: Principal) -> Response:
    """Stop the model's instance; the answer is its final status."""
    body = parse_model_request(await json_body(request, state))
    latest = await _latest(state, body.model)
    if not may_manage(principal, latest):
        raise not_yours(body.model)
    row = await state.supervisor.delete(latest)
    # An API rolling over has its previous version's instance live too: it stops as well.
    for other in await queries.live_instances_for_model(state.pool, body.model):
        if other.id != latest.id and may_manage(principal, other):
            await state.supervisor.delete(other)
    return JSONResponse(_status(state, row))


@authed("user")
async def run(request: Request, state: AppState, principal: Principal) -> Response:
    """Run the model: JSON, or a stream of text (or server-sent events)."""
    raw = await json_body(request, state)
    if isinstance(raw, dict) and INPUT in raw and PROMPT not in raw:
        return await _run_handler(request, state, principal, raw)
    body = parse_run_request(raw)
    ticket = await state.limiter.admit(principal, stream=body.stream)
    with ticket:
        route = await route_to(state, body.model, cold_wait_s(request.headers.get("prefer")))
        # Labelled only once routed: a label per made-up model name would grow forever.
        request.scope[MODEL_SCOPE_KEY] = body.model
        if body.stream:
            upstream = await relay.open_stream(
                state, route, body.payload, on_finish=ticket.end_stream
            )
            stream: Response
            if "text/event-stream" in request.headers.get("accept", ""):
                stream = relay.EventStream(upstream, _bytez_events)
            else:
                stream = relay.TextStream(upstream)
            stream.headers.update(ticket.headers)
            return stream
        answer = await relay.call(state, route, body.payload, request.receive)
    if answer is None:
        return Response(status_code=relay.CLIENT_CLOSED)
    if not isinstance(answer, dict) or not isinstance(answer.get("output"), str):
        raise InvalidAnswer("the model instance sent an invalid answer")
    return JSONResponse(
        {
            "output": answer["output"],
            "error": None,
            "tokens_generated": answer.get("tokens_generated"),
            "time_seconds": answer.get("time_seconds"),
            "tokens_per_second": answer.get("tokens_per_second"),
        },
        headers=ticket.headers,
    )


async def _run_handler(
    request: Request, state: AppState, principal: Principal, raw: dict[str, Any]
) -> Response:
    """`{"model", "input"}` for a handler model: the handler's output as `output`."""
    reject_unknown(raw, frozenset({MODEL, INPUT}))
    model = parse_model_field(raw)
    owner, _, name = model.partition("/")
    api = await api_calls.cached_api(state, owner, name)
    if api is not None and api.status == "deleted":
        api = None
    if api is not None and api_calls.may_call(principal, api):
        answer, headers = await api_calls.call_api(state, request, principal, api, raw[INPUT])
    else:
        row = await queries.get_model(state.pool, model)
        if api is not None or row is None or not row.present:
            raise ModelNotFound(f"model {model} is not in the catalog")
        if row.task != "handler":
            raise InvalidPrompt("'prompt' is required ('input' is for handler models)")
        ticket = await state.limiter.admit(principal)
        with ticket:
            route = await route_to(state, model, cold_wait_s(request.headers.get("prefer")))
            request.scope[MODEL_SCOPE_KEY] = model
            payload = proxy.RawJson(json.dumps(raw[INPUT], ensure_ascii=False).encode())
            answer = await relay.call(state, route, payload, request.receive, "/handle")
        headers = ticket.headers
        if answer is not None and not (isinstance(answer, dict) and "output" in answer):
            raise InvalidAnswer("the model instance sent an invalid answer")
    if answer is None:
        return Response(status_code=relay.CLIENT_CLOSED)
    return JSONResponse(
        {"output": answer["output"], "error": None, "time_seconds": answer.get("time_seconds")},
        headers=headers,
    )


async def _bytez_events(pieces: AsyncIterator[relay.Piece]) -> AsyncGenerator[dict[str, str], None]:
    """`data` per text chunk, then a `done` event with the token counts, or `error`."""
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
    Route("/model/load", load_model, methods=["POST"]),
    Route("/model/status", status, methods=["POST"]),
    Route("/model/run", run, methods=["POST"]),
    Route("/model/instances", list_instances, methods=["GET", "POST"]),
    Route("/model/delete", delete, methods=["POST"]),
]
