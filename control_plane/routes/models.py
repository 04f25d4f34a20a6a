"""/model/list: the catalog."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane.auth import Principal
from control_plane.handlers import authed, json_body
from control_plane.schemas import parse_list_request, render_model
from control_plane.state import AppState
from db import queries


@authed("user")
async def list_models(request: Request, state: AppState, principal: Principal) -> Response:
    """Every model in the catalog with its measured memory (null until benchmarked).

    POST may send `{"task": ...}` to filter; its body is validated like every other body.
    """
    task = None
    if request.method == "POST":
        task = parse_list_request(await json_body(request, state, empty={}))
    rows = await queries.list_models(state.pool)
    return JSONResponse([render_model(m) for m in rows if task is None or m.task == task])


routes = [Route("/model/list", list_models, methods=["GET", "POST"])]
