"""/model/list: the catalog."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane.auth import Principal
from control_plane.handlers import authed
from control_plane.schemas import render_model
from control_plane.state import AppState
from db import queries


@authed("user")
async def list_models(request: Request, state: AppState, principal: Principal) -> Response:
    """Every model in the catalog with its measured memory (null until benchmarked)."""
    return JSONResponse([render_model(m) for m in await queries.list_models(state.pool)])


routes = [Route("/model/list", list_models, methods=["GET", "POST"])]
