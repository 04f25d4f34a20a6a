"""/admin/keys: create, list, disable/enable, expire and revoke API keys (admin only)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import auth
from control_plane.auth import Principal
from control_plane.errors import KeyNotFound, LastAdminKey
from control_plane.handlers import authed, json_body
from control_plane.schemas import parse_key_create, parse_key_update, render_key
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


def _key_id(request: Request) -> int:
    raw = request.path_params["key_id"]
    # isascii: str.isdigit() also accepts '²' (int() then fails) and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise KeyNotFound("no such key")
    return int(raw)


@authed("admin")
async def update_key(request: Request, state: AppState, principal: Principal) -> Response:
    """Disable or enable a key, or set or clear its expiry (`{"disabled", "expiresAt"}`)."""
    key_id = _key_id(request)
    change = parse_key_update(await json_body(request, state))
    locks_out = change.disabled is True or (change.change_expiry and change.expires_at is not None)
    async with state.pool.acquire() as conn, conn.transaction():
        await queries.lock_admin_keys(conn)
        current = next((k for k in await queries.list_keys(conn) if k.id == key_id), None)
        if current is None or current.revoked_at is not None:
            raise KeyNotFound("no such key, or it is revoked")
        if (
            current.scope == "admin"
            and locks_out
            and await queries.other_usable_admin_keys(conn, key_id) == 0
        ):
            raise LastAdminKey(
                "this is the last usable admin key: create another admin key before "
                "disabling or expiring it"
            )
        row = await queries.set_key_state(
            conn, key_id, change.disabled, change.change_expiry, change.expires_at
        )
    if row is None:
        raise KeyNotFound("no such key, or it is revoked")
    state.auth.forget(row.id)
    return JSONResponse(render_key(row))


@authed("admin")
async def revoke_key(request: Request, state: AppState, principal: Principal) -> Response:
    """Revoke a key; it stops working at once on this control plane."""
    async with state.pool.acquire() as conn:
        row = await auth.revoke_key(conn, _key_id(request))
    state.auth.forget(row.id)
    return JSONResponse(render_key(row))


routes = [
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys", list_keys, methods=["GET"]),
    Route("/admin/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/admin/keys/{key_id}", update_key, methods=["PATCH"]),
]
