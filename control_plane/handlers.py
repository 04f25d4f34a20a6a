"""Glue every route handler shares: authentication, JSON bodies and the error envelope."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from control_plane.auth import Principal
from control_plane.bodies import read_json
from control_plane.errors import (
    DatabaseUnavailable,
    HttpProtocolError,
    MethodNotAllowed,
    MlcpError,
    RouteNotFound,
)
from control_plane.state import STATE_KEY, AppState, state_of
from db import DatabaseUnavailable as DatabaseDown
from db.pool import LOST_CONNECTION_ERRORS

logger = logging.getLogger(__name__)

Handler = Callable[[Request, AppState, Principal], Awaitable[Response]]


def error_response(exc: MlcpError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.message, "code": exc.code},
        status_code=exc.status_code,
        headers=exc.headers(),
    )


def authed(need: str = "user") -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a handler so it runs only for a key with at least scope `need`."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            state = state_of(request)
            principal = await state.auth.authenticate(request.headers, need)
            return await handler(request, state, principal)

        endpoint.__name__ = handler.__name__
        endpoint.__doc__ = handler.__doc__
        return endpoint

    return wrap


async def json_body(request: Request, state: AppState, *, empty: Any = None) -> Any:
    return await read_json(request, state.settings.max_body_bytes, empty=empty)


async def on_mlcp_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MlcpError)
    return error_response(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(RouteNotFound("no such route"))
    if exc.status_code == 405:
        resp = error_response(MethodNotAllowed())
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp
    err = HttpProtocolError(exc.detail if isinstance(exc.detail, str) else None)
    return JSONResponse({"error": err.message, "code": err.code}, status_code=exc.status_code)


async def on_database_unavailable(request: Request, exc: Exception) -> Response:
    # A database outage is a dependency down (503 + Retry-After), not a bug worth a 500;
    # the outage is logged once, not once per request.
    state: AppState | None = getattr(request.state, STATE_KEY, None)
    if state is not None:
        state.outage.failed(f"{request.method} {request.url.path}", exc, time.monotonic())
    return error_response(DatabaseUnavailable("the database is unreachable"))


# Handlers for every exception that means "the database is unavailable", for create_app.
DATABASE_HANDLERS = {
    cls: on_database_unavailable for cls in (DatabaseDown, *LOST_CONNECTION_ERRORS)
}


async def on_client_disconnect(request: Request, exc: Exception) -> Response:
    # The client went away (or was cut off by a receipt deadline) before its body arrived:
    # nobody is left to answer, and it is not an error of ours.
    logger.debug("client left during %s %s", request.method, request.url.path)
    return Response(status_code=499)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    # Never echo the exception: messages can hold paths, SQL or secrets.
    logger.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(MlcpError())
