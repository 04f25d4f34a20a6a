"""/admin/keys: create, list and revoke API keys (admin only)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import auth
from control_plane.auth import Principal
from control_plane.errors import KeyNotFound
from control_plane.handlers import authed, json_body
from control_plane.schemas import parse_key_create, render_key
from control_plane.state import AppState
from db import queries


@authed("admin")
async def create_key(request: Request, state: AppState, principal: Principal) -> Response:
    """Create a key; its secret is in this answer only."""
    body = parse_key_create(await json_body(request, state, empty={}))
    secret, key_id = await auth.create_key(state.pool, body.name, body.scope)
    row = next(k for k in await queries.list_keys(state.pool) if k.id == key_id)
    return JSONResponse(render_key(row, secret), status_code=201)


@authed("admin")
async def list_keys(request: Request, state: AppState, principal: Principal) -> Response:
    """Every key, without secrets."""
    return JSONResponse([render_key(k) for k in await queries.list_keys(state.pool)])


@authed("admin")
async def revoke_key(request: Request, state: AppState, principal: Principal) -> Response:
    """Revoke a key; it stops working at once on this control plane."""
    raw = request.path_params["key_id"]
    # isascii: str.isdigit() also accepts '²' (int() then fails) and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise KeyNotFound("no such key")
    async with state.pool.acquire() as conn:
        row = await auth.revoke_key(conn, int(raw))
    state.auth.forget(row.id)
    return JSONResponse(render_key(row))


routes = [
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys", list_keys, methods=["GET"]),
    Route("/admin/keys/{key_id}", revoke_key, methods=["DELETE"]),
]
