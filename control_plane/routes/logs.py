"""/model/logs: an instance's last log lines, for admins, the key that loaded it, and the owner
of the deployed API it serves."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from benchmarker.model_ids import model_id_problem
from control_plane.auth import Principal
from control_plane.errors import InvalidField, InvalidModelId, NotLoaded
from control_plane.handlers import authed
from control_plane.loading import not_loaded
from control_plane.routes.instances import may_manage, not_yours
from control_plane.state import AppState
from db import api_queries as aq
from db import queries

DEFAULT_TAIL = 200
MAX_TAIL = 5000


@authed("user")
async def logs(request: Request, state: AppState, principal: Principal) -> Response:
    """`GET /model/logs?model=org/name&tail=N`: the latest instance's log."""
    model = request.query_params.get("model", "")
    problem = model_id_problem(model)
    if problem:
        raise InvalidModelId(f"'model' {problem}")
    raw_tail = request.query_params.get("tail", str(DEFAULT_TAIL))
    # Length first: int() refuses strings of more than 4,300 digits with a ValueError.
    valid = raw_tail.isascii() and raw_tail.isdigit() and len(raw_tail) <= len(str(MAX_TAIL))
    if not valid or not 1 <= int(raw_tail) <= MAX_TAIL:
        raise InvalidField(f"'tail' must be an integer from 1 to {MAX_TAIL}")
    row = await queries.latest_instance_for_model(state.pool, model)
    if row is None:
        raise await not_loaded(state, model)
    if not row.handle:
        raise NotLoaded(f"model {model} has no instance with logs")
    if not may_manage(principal, row) and not await _owns_api(state, principal, model):
        # Another key's instance answers as if it were not there (tenancy: 404, not 403).
        raise not_yours(model)
    text = await state.supervisor.runtime.logs(row.handle, int(raw_tail))
    return PlainTextResponse(text + ("\n" if text else ""))


async def _owns_api(state: AppState, principal: Principal, model: str) -> bool:
    """A deployed API's log is its owner's, whichever key's call loaded its instance."""
    api = await aq.get_api_by_model(state.pool, model)
    return api is not None and api.owner == principal.name


routes = [Route("/model/logs", logs, methods=["GET"])]
