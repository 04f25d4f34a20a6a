"""/model/job: request a model and poll until it is available (control_plane/jobs.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane.auth import Principal
from control_plane.handlers import authed, json_body
from control_plane.jobs import request_model_job
from control_plane.schemas import parse_model_request
from control_plane.state import AppState


@authed("user")
async def model_job(request: Request, state: AppState, principal: Principal) -> Response:
    """Request a model: queue its benchmark, or report the state of its latest job."""
    body = parse_model_request(await json_body(request, state))
    answer = await request_model_job(state.pool, state.settings, body.model, datetime.now(UTC))
    return JSONResponse(answer)


routes = [Route("/model/job", model_job, methods=["POST"])]
