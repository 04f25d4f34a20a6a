"""/v1/async: submit an async request, poll it, list, cancel (control_plane/async_requests.py)."""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import async_requests as ar
from control_plane import webhooks
from control_plane.auth import Principal
from control_plane.errors import InvalidField
from control_plane.handlers import authed, json_body
from control_plane.schemas import iso
from control_plane.state import AppState
from db import async_queries as aq


def _base(request: Request) -> str:
    return str(request.base_url)


@authed("user")
async def submit(request: Request, state: AppState, principal: Principal) -> Response:
    """Store an async request for the model in the path; 202 once it is committed."""
    allow = webhooks.parse_allow(state.settings.webhook_allow)
    sub = ar.parse_submission(request.path_params["model"], await json_body(request, state), allow)
    # A submission is a call: counted (and limited) when it is accepted, not when it runs.
    ticket = await state.limiter.admit(principal)
    with ticket:
        row = await ar.submit(state, principal.key_id, sub)
    return JSONResponse(
        {"response": {"id": str(row.id), "urls": ar.urls(_base(request), row.id)}},
        status_code=202,
        headers=ticket.headers,
    )


@authed("user")
async def poll(request: Request, state: AppState, principal: Principal) -> Response:
    """One request of this key: its status, result or error, and timestamps."""
    row = await ar.get(state, principal.key_id, request.path_params["id"])
    return JSONResponse(ar.render(row, _base(request)))


@authed("user")
async def cancel(request: Request, state: AppState, principal: Principal) -> Response:
    """Cancel a request that has not finished (409 once it has)."""
    row = await ar.cancel(state, principal.key_id, request.path_params["id"])
    return JSONResponse(ar.render(row, _base(request)))


def _limit(text: str | None) -> int:
    if text is None:
        return 20
    if (
        not (text.isascii() and text.isdigit() and len(text) <= 3)
        or not 1 <= int(text) <= ar.MAX_PAGE
    ):
        raise InvalidField(f"'limit' must be a whole number from 1 to {ar.MAX_PAGE}")
    return int(text)


@authed("user")
async def list_requests(request: Request, state: AppState, principal: Principal) -> Response:
    """This key's requests, newest first; `?limit=N&after=<id>` pages on."""
    limit = _limit(request.query_params.get("limit"))
    after_text = request.query_params.get("after")
    after = None
    if after_text is not None:
        try:
            after = uuid.UUID(after_text)
        except ValueError as exc:
            raise InvalidField("'after' must be a request id") from exc
    rows = await aq.list_async_requests(state.pool, principal.key_id, after, limit)
    base = _base(request)
    nxt = None
    if len(rows) == limit:
        nxt = f"{base.rstrip('/')}/v1/async/requests?limit={limit}&after={rows[-1].id}"
    return JSONResponse({"requests": [ar.render(r, base) for r in rows], "next": nxt})


@authed("user")
async def deliveries(request: Request, state: AppState, principal: Principal) -> Response:
    """The webhook deliveries of one request of this key, oldest first."""
    row = await ar.get(state, principal.key_id, request.path_params["id"])
    found = await aq.list_webhook_deliveries(state.pool, row.id, principal.key_id)
    return JSONResponse(
        {
            "deliveries": [
                {
                    "id": str(d.id),
                    "event": d.event,
                    "url": d.url,
                    "state": d.state,
                    "attempts": d.attempts,
                    "last_status": d.last_status,
                    "last_error": d.last_error,
                    "created_at": iso(d.created_at),
                    "delivered_at": iso(d.delivered_at),
                    "next_attempt_at": iso(d.next_at) if d.state == "pending" else None,
                }
                for d in found
            ]
        }
    )


@authed("user")
async def webhook_secret(request: Request, state: AppState, principal: Principal) -> Response:
    """The secret this key's webhook deliveries are signed with (made on first use)."""
    return JSONResponse({"key": await ar.signing_secret(state, principal.key_id)})


# The request routes come first: a model path could otherwise swallow "requests/...".
routes = [
    Route("/v1/async/requests", list_requests, methods=["GET"]),
    Route("/v1/async/requests/{id}", poll, methods=["GET"]),
    Route("/v1/async/requests/{id}", cancel, methods=["DELETE"]),
    Route("/v1/async/requests/{id}/cancel", cancel, methods=["POST"]),
    Route("/v1/async/requests/{id}/webhooks", deliveries, methods=["GET"]),
    Route("/v1/webhooks/default/secret", webhook_secret, methods=["GET"]),
    Route("/v1/async/{model:path}", submit, methods=["POST"]),
]
