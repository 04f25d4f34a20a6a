"""/model/logs: an instance's last log lines, for admins and the key that loaded it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from control_plane.auth import Principal
from control_plane.errors import Forbidden, Invalid, NotFound
from control_plane.handlers import authed
from control_plane.schemas import model_id_problem
from control_plane.state import AppState
from db import queries

DEFAULT_TAIL = 200
MAX_TAIL = 5000


@authed("user")
async def logs(request: Request, state: AppState, principal: Principal) -> Response:
    """`GET /model/logs?model=org/name&tail=N`: the latest instance's log."""
    model = request.query_params.get("model", "")
    problem = model_id_problem(model)
    if problem:
        raise Invalid(f"'model' {problem}", code="invalid_model")
    raw_tail = request.query_params.get("tail", str(DEFAULT_TAIL))
    # The length check first: int() refuses strings of over 4,300 digits with a ValueError.
    if (
        not raw_tail.isascii()
        or not raw_tail.isdigit()
        or len(raw_tail) > 9
        or not 1 <= int(raw_tail) <= MAX_TAIL
    ):
        raise Invalid(f"'tail' must be an integer from 1 to {MAX_TAIL}", code="invalid_field")
    row = await queries.latest_instance_for_model(state.pool, model)
    if row is None or not row.handle:
        raise NotFound(f"model {model} has no instance with logs", code="not_loaded")
    if not principal.is_admin and row.owner_key_id != principal.key_id:
        raise Forbidden("only an admin or the key that loaded this instance may read its logs")
    text = await state.supervisor.runtime.logs(row.handle, int(raw_tail))
    return PlainTextResponse(text + ("\n" if text else ""))


routes = [Route("/model/logs", logs, methods=["GET"])]
