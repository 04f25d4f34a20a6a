"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Thin: parse (control_plane/openai_schemas.py), find or load the model on demand through the one
load path (control_plane/loading.py), relay (control_plane/relay.py), render. Every error,
authentication included, is answered in OpenAI's envelope with mlcp's status codes, so the
`openai` SDK raises NotFoundError, UnprocessableEntityError, RateLimitError... as it should.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from json.encoder import encode_basestring
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import relay
from control_plane.auth import Principal
from control_plane.errors import InvalidAnswer, MlcpError, UnsupportedTask
from control_plane.handlers import json_body
from control_plane.loading import OnDemand, check_runnable, cold_wait_s, route_to
from control_plane.metrics import MODEL_SCOPE_KEY
from control_plane.openai_schemas import (
    Generation,
    error_body,
    new_id,
    parse_chat,
    parse_completion,
    parse_embeddings,
    render_chat,
    render_completion,
    render_embeddings,
    usage,
)
from control_plane.state import AppState, state_of
from control_plane.supervisor import Route as InstanceRoute
from db import queries

# How long a request naming a model that is not loaded waits for it to load.
ON_DEMAND_WAIT_S = 120.0
GENERATES = "text-generation"
EMBEDS = "feature-extraction"

OpenAIHandler = Callable[[Request, AppState, Principal], Awaitable[Response]]


def openai_error(exc: MlcpError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status_code, headers=exc.headers())


def openai_endpoint(handler: OpenAIHandler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate (any user key, `Authorization: Bearer` as OpenAI clients send it) and render
    every mlcp error in OpenAI's envelope."""

    async def endpoint(request: Request) -> Response:
        state = state_of(request)
        try:
            principal = await state.auth.authenticate(request.headers, "user")
            return await handler(request, state, principal)
        except MlcpError as exc:
            return openai_error(exc)

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


async def serving(
    request: Request, state: AppState, principal: Principal, model: str, task: str
) -> InstanceRoute:
    """Where `model` runs, loading it on demand; a model of another task is refused first.

    A model that is running was checked when its instance loaded, so its task is taken from
    memory: a catalog query per request added 0.5 ms to the time to first token.
    """
    route = state.supervisor.route(model)
    known = state.model_tasks.get(model) if route is not None else None
    if known is None:
        row = check_runnable(await queries.get_model(state.pool, model), model)
        known = state.model_tasks[model] = row.task
    # Labelled only once known to the catalog: a label per made-up name would grow forever.
    request.scope[MODEL_SCOPE_KEY] = model
    if known != task:
        wanted = "embeddings" if task == EMBEDS else "text generation"
        raise UnsupportedTask(f"model {model} is a {known} model; it does not serve {wanted}")
    if route is not None:
        return route
    on_demand = OnDemand(
        principal.key_id,
        1,
        state.settings.on_demand_expiration_s,
        state.limiter.limits_of(principal).max_instances,
    )
    wait_s = cold_wait_s(request.headers.get("prefer"), ON_DEMAND_WAIT_S)
    return await route_to(state, model, wait_s, on_demand)


@openai_endpoint
async def list_models(request: Request, state: AppState, principal: Principal) -> Response:
    """The benchmarked models, as OpenAI's model list with mlcp's fields beside."""
    rows = await queries.list_models(state.pool)
    data = [
        {
            "id": row.name,
            "object": "model",
            "created": int(row.benchmarked_at.timestamp()) if row.benchmarked_at else 0,
            "owned_by": row.name.split("/", 1)[0],
            "task": row.task,
            "requiredRAM": round(row.required_ram_bytes / 1e9, 3),
            "loaded": state.supervisor.route(row.name) is not None,
        }
        for row in rows
        if row.present and row.required_ram_bytes is not None
    ]
    return JSONResponse({"object": "list", "data": data})


async def _generate(
    request: Request, state: AppState, principal: Principal, gen: Generation, kind: str
) -> Response:
    ticket = await state.limiter.admit(principal, stream=gen.stream)
    with ticket:
        route = await serving(request, state, principal, gen.model, GENERATES)
        if gen.stream:
            upstream = await relay.open_stream(
                state, route, gen.payload, on_finish=ticket.end_stream
            )
            stream = relay.EventStream(upstream, _chunks(gen, kind))
            stream.headers.update(ticket.headers)
            return stream
        answer = await relay.call(state, route, gen.payload, request.receive)
    if answer is None:
        return Response(status_code=relay.CLIENT_CLOSED)
    if not isinstance(answer, dict) or not isinstance(answer.get("output"), str):
        raise InvalidAnswer("the model instance sent an invalid answer")
    render = render_chat if kind == "chat" else render_completion
    return JSONResponse(render(gen.model, answer), headers=ticket.headers)


@openai_endpoint
async def chat_completions(request: Request, state: AppState, principal: Principal) -> Response:
    """`POST /v1/chat/completions`: one answer, or `chat.completion.chunk` events."""
    gen = parse_chat(await json_body(request, state))
    return await _generate(request, state, principal, gen, "chat")


@openai_endpoint
async def completions(request: Request, state: AppState, principal: Principal) -> Response:
    """`POST /v1/completions`: plain continuation of a prompt."""
    gen = parse_completion(await json_body(request, state))
    return await _generate(request, state, principal, gen, "completion")


@openai_endpoint
async def embeddings(request: Request, state: AppState, principal: Principal) -> Response:
    """`POST /v1/embeddings`: normalised sentence embeddings."""
    body = parse_embeddings(await json_body(request, state))
    ticket = await state.limiter.admit(principal)
    with ticket:
        route = await serving(request, state, principal, body.model, EMBEDS)
        answer = await relay.call(state, route, body.payload, request.receive, path="/embed")
    if answer is None:
        return Response(status_code=relay.CLIENT_CLOSED)
    if not isinstance(answer, dict) or not isinstance(answer.get("embeddings"), list):
        raise InvalidAnswer("the model instance sent an invalid answer")
    return JSONResponse(render_embeddings(body, answer), headers=ticket.headers)


# What json.dumps(..., ensure_ascii=False) gives, without building an encoder per call.
_ENCODE = json.JSONEncoder(ensure_ascii=False).encode
# Not a character a model id (the Hub's rules) or the fixed fields can hold.
_MARK = "\u2063mlcp-text\u2063"


def _chunks(gen: Generation, kind: str) -> relay.EventRenderer:
    """Renders agent pieces as OpenAI stream chunks, then the usage chunk and `[DONE]`."""
    chat = kind == "chat"
    base = {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": gen.model,
    }

    def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, str]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        payload: dict[str, Any] = {**base, "choices": [choice]}
        if gen.include_usage:
            payload["usage"] = None
        return {"data": _ENCODE(payload)}

    # A text chunk is the same JSON each time but for its text: rendered once around a mark,
    # then each chunk is the two halves around its JSON-encoded text (one C call, not a dict
    # and an encoder per token).
    head, mark, tail = chunk(_MARK, None)["data"].partition(_ENCODE(_MARK))
    exact = bool(mark) and _ENCODE(_MARK) not in tail

    def text_chunk(text: str) -> dict[str, str]:
        if not exact:  # the mark was in a fixed field too: rendered whole
            return chunk(text, None)
        return {"data": head + encode_basestring(text) + tail}

    async def render(
        pieces: AsyncIterator[relay.Piece],
    ) -> AsyncGenerator[relay.Event | list[relay.Event], None]:
        # A chat stream opens with the assistant's role; it goes out with the first piece, in
        # the same write (written alone, it cost the first token a write and a client read).
        events: list[relay.Event] = [chunk("", None, role=True)] if chat else []
        async for text, last in pieces:
            if text:
                events.append(text_chunk(text))
            if last is None:
                if events:
                    yield events[0] if len(events) == 1 else events
                    events = []
                continue
            if last.get("done"):
                reason = last.get("finish_reason")
                events.append(
                    chunk(None if chat else "", reason if reason in ("stop", "length") else "stop")
                )
                if gen.include_usage:
                    counts = usage(
                        int(last.get("prompt_tokens", 0)), int(last.get("tokens_generated", 0))
                    )
                    events.append({"data": _ENCODE({**base, "choices": [], "usage": counts})})
            else:
                message = str(last.get("error", "generation failed"))
                error = {"message": message, "type": "server_error", "param": None}
                events.append({"data": json.dumps({"error": {**error, "code": last.get("code")}})})
            events.append({"data": "[DONE]"})
            yield events
            return
        if events:
            yield events

    return render


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
]
