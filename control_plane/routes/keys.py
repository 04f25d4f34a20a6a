"""/admin/keys: create, list, disable/enable, expire, limit and revoke API keys (admin only)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import auth
from control_plane.auth import Principal
from control_plane.errors import KeyNotFound, LastAdminKey
from control_plane.handlers import authed, json_body
from control_plane.limits import effective, render_limits
from control_plane.schemas import parse_key_create, parse_key_update, render_key
from control_plane.state import AppState
from db import queries
from db.rows import KeyRow


def _render(state: AppState, row: KeyRow, secret: str | None = None) -> dict[str, Any]:
    out = render_key(row, secret)
    # What applies: the key's own limits, the MLCP_DEFAULT_* settings where it has none.
    out["effectiveLimits"] = render_limits(effective(row.limits, row.scope, state.limiter.defaults))
    return out


@authed("admin")
async def create_key(request: Request, state: AppState, principal: Principal) -> Response:
    """Create a key; its secret is in this answer only."""
    body = parse_key_create(await json_body(request, state, empty={}))
    async with state.pool.acquire() as conn, conn.transaction():
        secret, key_id = await auth.create_key(conn, body.name, body.scope)
        if body.limits:
            await queries.set_key_limits(conn, key_id, body.limits)
        row = next(k for k in await queries.list_keys(conn) if k.id == key_id)
    return JSONResponse(_render(state, row, secret), status_code=201)


@authed("admin")
async def list_keys(request: Request, state: AppState, principal: Principal) -> Response:
    """Every key, without secrets."""
    return JSONResponse([_render(state, k) for k in await queries.list_keys(state.pool)])


def _key_id(request: Request) -> int:
    raw = request.path_params["key_id"]
    # isascii: str.isdigit() also accepts '²' (int() then fails) and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise KeyNotFound("no such key")
    return int(raw)


@authed("admin")
async def update_key(request: Request, state: AppState, principal: Principal) -> Response:
    """Disable or enable a key, set or clear its expiry, set its limits (parse_key_update)."""
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
        if row is not None and change.limits:
            row = await queries.set_key_limits(conn, key_id, change.limits)
    if row is None:
        raise KeyNotFound("no such key, or it is revoked")
    # Other control planes see new limits when their cached verification ends (MLCP_AUTH_CACHE_S).
    state.auth.forget(row.id)
    return JSONResponse(_render(state, row))


@authed("admin")
async def revoke_key(request: Request, state: AppState, principal: Principal) -> Response:
    """Revoke a key; it stops working at once on this control plane."""
    async with state.pool.acquire() as conn:
        row = await auth.revoke_key(conn, _key_id(request))
    state.auth.forget(row.id)
    return JSONResponse(_render(state, row))


routes = [
    Route("/admin/keys", create_key, methods=["POST"]),
    Route("/admin/keys", list_keys, methods=["GET"]),
    Route("/admin/keys/{key_id}", revoke_key, methods=["DELETE"]),
    Route("/admin/keys/{key_id}", update_key, methods=["PATCH"]),
]
