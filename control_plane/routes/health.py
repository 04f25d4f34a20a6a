"""/health (process up), /ready (database reachable) and /openapi.json; no auth."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane.errors import DatabaseUnavailable
from control_plane.handlers import error_response
from control_plane.openapi import openapi_document
from control_plane.state import state_of

READY_TIMEOUT_S = 2.0


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state = state_of(request)
    try:
        await asyncio.wait_for(state.pool.fetchval("SELECT 1"), READY_TIMEOUT_S)
    except (OSError, TimeoutError, Exception):
        # Any failure to answer SELECT 1 means "not ready"; the cause is in the pool's own logs.
        return error_response(DatabaseUnavailable("the database is unreachable"))
    return JSONResponse({"status": "ready", "database": "ok"})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


routes = [
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
