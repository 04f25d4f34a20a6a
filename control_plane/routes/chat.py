"""`POST /chat`: the single-model HTTP server's contract, served for any model of the catalog.

The body is the agent's own /chat body (`instance_agent/chat.py`) plus an optional `model`:
default `MLCP_DEFAULT_MODEL`, else the only running instance, else 422 naming the choices. The
answer has exactly the single-model server's fields; errors use mlcp's envelope.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from benchmarker.model_ids import model_id_problem
from control_plane import relay
from control_plane.auth import Principal
from control_plane.errors import InvalidAnswer, InvalidField, InvalidModelId
from control_plane.handlers import authed, json_body
from control_plane.routes.openai import GENERATES, serving
from control_plane.state import AppState
from instance_agent.chat import render_chat, validate_chat_body
from instance_agent.protocol import DEFAULT_MAX_NEW_TOKENS_CAP, ProtocolError


def _pick_model(state: AppState, asked: str | None) -> str:
    if asked is not None:
        problem = model_id_problem(asked)
        if problem is not None:
            raise InvalidModelId(problem)
        return asked
    if state.settings.default_model:
        return state.settings.default_model
    running = state.supervisor.running_models()
    if len(running) == 1:
        return running[0]
    choices = ", ".join(sorted(running)) if running else "none is running"
    raise InvalidField(
        f"name a model in the body ('model'): no MLCP_DEFAULT_MODEL is set and "
        f"{'several models are running: ' if running else ''}{choices}"
    )


@authed("user")
async def chat(request: Request, state: AppState, principal: Principal) -> Response:
    """Generate an answer to one prompt; greedy unless `temperature` > 0."""
    try:
        body = validate_chat_body(await json_body(request, state), allow_model=True)
    except ProtocolError as exc:
        raise InvalidField(exc.message) from exc
    model = _pick_model(state, body.model)
    params = body.params()
    payload = {
        "prompt": body.prompt,
        "params": {
            # The agent bounds every answer (1024 tokens by default) below /chat's 2048.
            "max_tokens": min(params.max_new_tokens or 1, DEFAULT_MAX_NEW_TOKENS_CAP),
            **({"do_sample": True, "temperature": body.temperature} if params.do_sample else {}),
        },
    }
    ticket = await state.limiter.admit(principal)
    with ticket:
        route = await serving(request, state, principal, model, GENERATES)
        answer = await relay.call(state, route, payload, request.receive)
    if answer is None:
        return Response(status_code=relay.CLIENT_CLOSED)
    if not isinstance(answer, dict) or not isinstance(answer.get("output"), str):
        raise InvalidAnswer("the model instance sent an invalid answer")
    tokens = int(answer.get("tokens_generated") or 0)
    seconds = float(answer.get("time_seconds") or 0.0)
    return JSONResponse(
        render_chat(body.prompt, answer["output"], tokens, seconds), headers=ticket.headers
    )


routes = [Route("/chat", chat, methods=["POST"])]
