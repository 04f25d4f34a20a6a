"""`GET /usage`: calls per key per month (a user key sees its own, an admin key every key)."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane.auth import Principal
from control_plane.handlers import authed
from control_plane.limits import effective, parse_month, render_month
from control_plane.state import AppState
from db import queries
from db.rows import KeyLimits, UsageRow


def render_usage(state: AppState, row: UsageRow) -> dict[str, Any]:
    limit = effective(KeyLimits(monthly_calls=row.monthly_calls), row.scope, state.limiter.defaults)
    most = limit.monthly_calls
    return {
        "id": row.key_id,
        "name": row.name,
        "scope": row.scope,
        "revoked": row.revoked,
        "calls": row.calls,
        # The quota that applies (0: unlimited), and what is left of it (null: unlimited).
        "monthlyCalls": most,
        "remaining": max(0, most - row.calls) if most else None,
    }


@authed("user")
async def usage(request: Request, state: AppState, principal: Principal) -> Response:
    """Calls of `?month=YYYY-MM` (default this UTC month) per key, counted by every node.

    This control plane's calls are written first; another one's reach the database within a
    second of being served (control_plane/quotas.py).
    """
    month = parse_month(request.query_params.get("month"), time.time())
    await state.limiter.flush()
    rows = await queries.usage_for_month(
        state.pool, month, None if principal.is_admin else principal.key_id
    )
    return JSONResponse(
        {"month": render_month(month), "keys": [render_usage(state, r) for r in rows]}
    )


routes = [Route("/usage", usage, methods=["GET"])]
