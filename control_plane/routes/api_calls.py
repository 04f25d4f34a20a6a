"""Calling a deployed API: `POST /{api}` (Cortex), `GET|POST /{owner}/{api}` (CellStrat).

Mounted after every other route: a path whose first segment is a route's name (`model`, `v1`,
`health`, ...; API names may not be one) is answered as the router would have without these
routes, 404 `not_found` or 405 with `Allow`. A cold API is loaded through the one load path
(`loading.route_to`) with its spec's concurrency and expiry, and the call waits for it (up to
120 s, `Prefer: wait=N` for less); the payload is relayed to the agent's `POST /handle`.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route

from benchmarker.model_ids import is_valid_model_id
from control_plane import proxy, relay
from control_plane.auth import Principal
from control_plane.errors import (
    ApiNotReady,
    InvalidAnswer,
    RouteNotFound,
)
from control_plane.handlers import json_body
from control_plane.loading import MAX_COLD_WAIT_S, OnDemand, cold_wait_s, route_to
from control_plane.metrics import MODEL_SCOPE_KEY
from control_plane.routes.apis import render_api
from control_plane.state import AppState, state_of
from control_plane.supervisor import Route as InstanceRoute
from db import api_queries as aq
from db.rows import ApiRow
from instance_agent.project import API_NAME, RESERVED_NAMES, ProjectSpec
from instance_agent.protocol import LoadFailed as AgentLoadFailed
from instance_agent.user_code import read_project_spec


def may_call(principal: Principal, row: ApiRow) -> bool:
    """Its owner, admins, and anyone when the spec says `public: true`."""
    return row.public or principal.is_admin or principal.name == row.owner


@lru_cache(maxsize=256)
def _spec(version_dir: str) -> ProjectSpec:
    return read_project_spec(Path(version_dir))


def not_an_api(request: Request) -> HTTPException | RouteNotFound:
    """What the router answers for this path without the API routes: 405 or 404."""
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if route in routes:
            continue
        match, _ = route.matches(request.scope)
        if match == Match.PARTIAL and isinstance(route, Route) and route.methods:
            allowed |= route.methods
    if allowed:
        return HTTPException(405, headers={"Allow": ", ".join(sorted(allowed))})
    return RouteNotFound("no such route")


def _is_api_path(owner: str, name: str) -> bool:
    return (
        owner not in RESERVED_NAMES
        and is_valid_model_id(f"{owner}/{name}")
        and bool(API_NAME.match(name))
    )


async def _principal(request: Request, owner: str, name: str) -> tuple[AppState, Principal]:
    """The caller, once the path can name an API at all (else the router's own answer)."""
    if not _is_api_path(owner, name):
        raise not_an_api(request)
    state = state_of(request)
    return state, await state.auth.authenticate(request.headers, "user")


async def find_api(state: AppState, principal: Principal, owner: str, name: str) -> ApiRow:
    """The API a call names; an unknown one, or another owner's private one, is a path like
    any other that leads nowhere (404 not_found), so nothing is revealed about it."""
    row = await cached_api(state, owner, name)
    if row is None or row.status == "deleted" or not may_call(principal, row):
        raise RouteNotFound("no such route")
    return row


# Entries the cache holds at most before it starts afresh (bounds memory under made-up names).
_CACHE_MAX = 10_000


async def cached_api(state: AppState, owner: str, name: str) -> ApiRow | None:
    """The API row, trusted for `MLCP_AUTH_CACHE_S` as keys are: keeps a database round trip
    (~0.5 ms, and more under load) off every warm call. Deploys and deletes here forget it at
    once; other control planes see them within the period."""
    now = time.monotonic()
    hit = state.api_cache.get((owner, name))
    if hit is not None and hit[1] > now:
        return hit[0]
    row = await aq.get_api(state.pool, owner, name)
    if len(state.api_cache) >= _CACHE_MAX:
        state.api_cache.clear()
    state.api_cache[(owner, name)] = (row, now + state.settings.auth_cache_s)
    return row


async def route_api(
    state: AppState, principal: Principal, row: ApiRow, wait_s: float
) -> InstanceRoute:
    """The API's instance, loaded on demand when cold; the call waits for it."""
    route = state.supervisor.route(row.model)
    if route is not None:
        return route
    version = await aq.get_api_version(state.pool, row.owner, row.name, row.version)
    if row.status != "available" or version is None:
        # An earlier version may still serve while this one builds: only a cold API waits.
        detail = f"; {row.reason}" if row.reason else ""
        raise ApiNotReady(f"API {row.name} version {row.version} is {row.status}{detail}")
    try:
        spec = _spec(version.storage_path)
    except AgentLoadFailed as exc:
        raise ApiNotReady(f"API {row.name}'s spec cannot be read: {exc.message}") from exc
    on_demand = OnDemand(
        principal.key_id,
        spec.concurrency,
        spec.expiration_s,
        state.limiter.limits_of(principal).max_instances,
    )
    return await route_to(state, row.model, wait_s, on_demand)


async def call_api(
    state: AppState, request: Request, principal: Principal, row: ApiRow, payload: Any
) -> tuple[Any | None, dict[str, str]]:
    """Relay one payload to the API's handler: its output (None when the client left), and the
    caller's RateLimit-* headers (a call counts against the caller's limits, not the owner's)."""
    ticket = await state.limiter.admit(principal)
    with ticket:
        route = await route_api(
            state, principal, row, cold_wait_s(request.headers.get("prefer"), MAX_COLD_WAIT_S)
        )
        request.scope[MODEL_SCOPE_KEY] = row.model
        raw = proxy.RawJson(json.dumps(payload, ensure_ascii=False).encode())
        answer = await relay.call(state, route, raw, request.receive, "/handle")
    if answer is None:
        return None, ticket.headers
    if not isinstance(answer, dict) or "output" not in answer:
        raise InvalidAnswer("the API's instance sent an invalid answer")
    return answer, ticket.headers


async def one_segment(request: Request) -> Response:
    """Any method on `/{x}`: `POST /{api}` calls an API, the rest is the router's answer."""
    if request.method != "POST":
        raise not_an_api(request)
    return await cortex(request)


async def two_segments(request: Request) -> Response:
    """Any method on `/{x}/{y}`: GET and POST reach a CellStrat-style API."""
    if request.method == "GET":
        return await cellstrat_status(request)
    if request.method == "POST":
        return await cellstrat_call(request)
    raise not_an_api(request)


async def cortex(request: Request) -> Response:
    """`POST /{api}`: the caller's own API; the answer is the handler's return value."""
    name = str(request.path_params["api"])
    if name in RESERVED_NAMES or not API_NAME.match(name):
        raise not_an_api(request)
    state = state_of(request)
    principal = await state.auth.authenticate(request.headers, "user")
    row = await find_api(state, principal, principal.name, name)
    payload = await json_body(request, state)
    answer, headers = await call_api(state, request, principal, row, payload)
    if answer is None:
        return Response(status_code=relay.CLIENT_CLOSED)
    return JSONResponse(answer["output"], headers=headers)


async def cellstrat_status(request: Request) -> Response:
    """`GET /{owner}/{api}`: load the API (waiting for it) and answer its status."""
    owner, name = str(request.path_params["owner"]), str(request.path_params["api"])
    state, principal = await _principal(request, owner, name)
    row = await find_api(state, principal, owner, name)
    await route_api(
        state, principal, row, cold_wait_s(request.headers.get("prefer"), MAX_COLD_WAIT_S)
    )
    await state.activity.flush(state.pool)
    return JSONResponse(await render_api(state, row))


async def cellstrat_call(request: Request) -> Response:
    """`POST /{owner}/{api}`: `{"statusCode": 200, "body": {"output": <return value>}}`."""
    owner, name = str(request.path_params["owner"]), str(request.path_params["api"])
    state, principal = await _principal(request, owner, name)
    row = await find_api(state, principal, owner, name)
    payload = await json_body(request, state)
    answer, headers = await call_api(state, request, principal, row, payload)
    if answer is None:
        return Response(status_code=relay.CLIENT_CLOSED)
    return JSONResponse({"statusCode": 200, "body": {"output": answer["output"]}}, headers=headers)


# The documented shapes first (docs/api.md, /openapi.json); then every other method, so that a
# path these match only by its shape is answered by the router's own rules (not_an_api) instead
# of a 405 for a method the API routes do not take.
_OTHER_METHODS = ("GET", "PUT", "PATCH", "DELETE", "OPTIONS")
routes: list[BaseRoute] = [
    Route("/{api}", one_segment, methods=["POST"]),
    Route("/{owner}/{api}", two_segments, methods=["GET", "POST"]),
    Route("/{api}", one_segment, methods=_OTHER_METHODS, include_in_schema=False),
    Route(
        "/{owner}/{api}",
        two_segments,
        methods=[m for m in _OTHER_METHODS if m != "GET"],
        include_in_schema=False,
    ),
]
