"""GET /events: lifecycle events as server-sent events, with Last-Event-ID replay.

`?tail=N` (0-1000, default 0) replays the newest N events on a fresh connection; `Last-Event-ID`
(header, or `?lastEventId=` for the first connection of a browser's EventSource) replays every
event after that id instead; `?follow=0` ends the stream after the replay. Each event is
`event: lifecycle`, `id: <cursor>`, `data: {...}`: the cursor is the highest id sent so far, the
value to resume from. Admin keys see every event; user keys their own instances' and job events.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from control_plane import events as hub
from control_plane.auth import Principal, extract_key
from control_plane.errors import BadRequest, InvalidLastEventId, InvalidQuery
from control_plane.state import AppState, state_of

MAX_TAIL = 1000
PING_S = 10
# An event id is a bigint: at most 19 digits.
_MAX_ID_DIGITS = 18


def _int_param(raw: str, name: str, high: int, error: type[BadRequest]) -> int:
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > _MAX_ID_DIGITS or int(raw) > high:
        raise error(f"'{name}' must be an integer from 0 to {high}")
    return int(raw)


def _follow(raw: str | None) -> bool:
    if raw is None:
        return True
    value = raw.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise InvalidQuery("'follow' must be 1 or 0")


async def events(request: Request) -> Response:
    """Lifecycle events of jobs, instances and evictions, as they happen.

    A key in the headers, or the dashboard's session cookie (its page listens here).
    """
    from control_plane.dashboard import session_principal

    state = state_of(request)
    found = None if extract_key(request.headers) else await session_principal(request, state)
    principal = found[0] if found else await state.auth.authenticate(request.headers, "user")
    params = request.query_params
    raw_last = request.headers.get("last-event-id") or params.get("lastEventId")
    after_id = (
        None
        if raw_last is None or not raw_last.strip()
        else _int_param(raw_last, "Last-Event-ID", 2**63 - 1, InvalidLastEventId)
    )
    tail = _int_param(params.get("tail", "0"), "tail", MAX_TAIL, InvalidQuery)
    keep_following = _follow(params.get("follow"))
    return EventSourceResponse(
        _stream(state, principal, after_id, tail, keep_following),
        ping=PING_S,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _stream(
    state: AppState, principal: Principal, after_id: int | None, tail: int, keep_following: bool
) -> AsyncIterator[dict[str, str]]:
    with state.events.subscribe(principal) as sub:
        cursor = after_id or 0
        async for row in hub.follow(state.pool, sub, after_id, tail, keep_following=keep_following):
            cursor = max(cursor, row.id)
            yield {
                "event": "lifecycle",
                "id": str(cursor),
                "data": json.dumps(hub.render_lifecycle_event(row)),
            }


routes = [Route("/events", events, methods=["GET"])]
