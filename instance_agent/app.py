"""The agent's HTTP app over one model, loaded once in the background (`instance_agent.state`).

Routes: /health, /run and /stream (the agent protocol), /chat (the single-model server's
contract, `instance_agent.chat`), /embed for embedding models, /transcribe for speech
recognition (`instance_agent.speech`), /handle for handler projects
(`instance_agent.user_code`), PUT /config. /health answers from
the first moment (503 while loading); torch is imported only by the loader thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from instance_agent.batcher import Batcher
from instance_agent.chat import chat_error as render_chat_error
from instance_agent.chat import render_chat, validate_chat_body
from instance_agent.embeddings import EmbedResponse, validate_embed_body
from instance_agent.lease import LEASE_ENV, LEASE_HEADER, Lease, parse_lease_s, watch
from instance_agent.protocol import (
    HEALTH_NOTE_FAILED,
    HEALTH_NOTE_LOADING,
    HEALTH_NOTE_READY,
    MAX_BODY_BYTES,
    NDJSON_MEDIA_TYPE,
    AgentError,
    GenerationFailed,
    HealthLoading,
    HealthReady,
    InternalError,
    InvalidJson,
    InvalidParams,
    LoadFailed,
    MethodNotAllowed,
    ModelLoading,
    NotFound,
    PayloadTooLarge,
    RunRequest,
    RunResponse,
    StreamDone,
    StreamError,
    StreamText,
    UnsupportedMediaType,
    validate_run_body,
)
from instance_agent.state import AgentConfig, AgentState, agent_state, state_of
from instance_agent.streaming import EventChannel, Failed, Finished, Row, TextChunk
from instance_agent.weights import HANDLER_SPEC_FILE

__all__ = ["AgentConfig", "AgentState", "agent_state", "create_app"]

logger = logging.getLogger(__name__)

# The largest audio file /transcribe takes (the control plane's MLCP_MAX_UPLOAD_BYTES default).
MAX_AUDIO_BYTES = 1 << 30

# The control plane's own bound on a load's concurrency.
MAX_CONCURRENCY = 64

# A body over the limit is still read (and dropped) up to this much, so the client gets its 413
# instead of a connection reset while it is still writing.
_DRAIN_LIMIT_BYTES = 16 * MAX_BODY_BYTES


async def _read_json(request: Request) -> Any:
    """Read a JSON body of at most 1 MiB (415 for another media type, 413 when larger)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise UnsupportedMediaType()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _DRAIN_LIMIT_BYTES:
            break
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
    if size > MAX_BODY_BYTES:
        raise PayloadTooLarge()
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise InvalidJson() from exc


async def _admit(request: Request) -> tuple[Row, Batcher]:
    state = state_of(request)
    body = await _read_json(request)
    run_request = validate_run_body(body, max_new_tokens_cap=state.config.max_new_tokens_cap)
    return await _admit_request(state, run_request)


async def _admit_request(state: AgentState, run_request: RunRequest) -> tuple[Row, Batcher]:
    engine, batcher = state.ready()
    batcher.reserve()
    try:
        prompt_ids = await asyncio.to_thread(
            functools.partial(engine.encode, run_request.prompt, raw=run_request.params.raw)
        )
        max_new_tokens = run_request.params.new_tokens_for(
            len(prompt_ids),
            context_tokens=engine.context_tokens,
            cap=state.config.max_new_tokens_cap,
        )
    except BaseException:
        batcher.unreserve()
        raise
    row = Row(
        prompt_ids, run_request.params, max_new_tokens, EventChannel(asyncio.get_running_loop())
    )
    batcher.submit(row)
    return row, batcher


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(row: Row) -> tuple[str, Finished]:
    parts: list[str] = []
    while True:
        event = await row.channel.receive()
        if isinstance(event, TextChunk):
            parts.append(event.text)
        elif isinstance(event, Finished):
            return "".join(parts), event
        else:
            raise GenerationFailed(event.message)


async def _generate_whole(
    request: Request, row: Row, batcher: Batcher
) -> tuple[str, Finished] | None:
    """Collect a row's whole answer; None when the client went away first."""
    collecting = asyncio.ensure_future(_collect(row))
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collecting, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if not collecting.done():
            # Nobody will read this answer; free the row's place in its batch.
            return None
        return collecting.result()
    finally:
        for task in (collecting, disconnect):
            task.cancel()
        if not row.done:
            batcher.cancel(row)


async def run(request: Request) -> Response:
    """Generate a whole answer and return it as one JSON body."""
    row, batcher = await _admit(request)
    answer = await _generate_whole(request, row, batcher)
    if answer is None:
        return Response(status_code=499)
    output, finished = answer
    body: RunResponse = {
        "output": output,
        "tokens_generated": finished.tokens_generated,
        "time_seconds": round(finished.time_seconds, 6),
        "tokens_per_second": round(finished.tokens_per_second, 3),
        "prompt_tokens": finished.prompt_tokens,
        "finish_reason": finished.finish_reason,
    }
    return JSONResponse(body)


async def chat(request: Request) -> Response:
    """`POST /chat`: the single-model server's contract; errors are `{"error": ...}` alone."""
    try:
        state = state_of(request)
        chat_request = validate_chat_body(await _read_json(request))
        run_request = RunRequest(prompt=chat_request.prompt, params=chat_request.params())
        row, batcher = await _admit_request(state, run_request)
        answer = await _generate_whole(request, row, batcher)
    except AgentError as exc:
        status, error = render_chat_error(exc)
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse(error, status_code=status, headers=headers)
    if answer is None:
        return Response(status_code=499)
    output, finished = answer
    return JSONResponse(
        render_chat(chat_request.prompt, output, finished.tokens_generated, finished.time_seconds)
    )


async def embed(request: Request) -> Response:
    """`POST /embed {"input": ...}`: normalised sentence embeddings, batched with other requests."""
    state = state_of(request)
    texts = validate_embed_body(await _read_json(request))
    batcher = state.ready_encoder()
    vectors, tokens = await batcher.embed(texts)
    body: EmbedResponse = {
        "embeddings": vectors,
        "prompt_tokens": tokens,
        "dimensions": len(vectors[0]) if vectors else 0,
    }
    return JSONResponse(body)


async def _read_audio(request: Request) -> bytes:
    """The raw body of /transcribe, at most MAX_AUDIO_BYTES (counted, not trusted)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_AUDIO_BYTES:
        raise PayloadTooLarge(f"the audio must be at most {MAX_AUDIO_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_AUDIO_BYTES:
            raise PayloadTooLarge(f"the audio must be at most {MAX_AUDIO_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _asr_options(text: str | None) -> dict[str, Any]:
    from instance_agent.asr_options import validate_asr_options

    if text is None:
        return {}
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidParams("'options' must be a JSON object of Whisper options") from exc
    return validate_asr_options(parsed)


async def _set_on_disconnect(request: Request, flag: threading.Event) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    flag.set()


async def transcribe(request: Request) -> Response:
    """`POST /transcribe?options=<json>`, the audio file as the body: `{"text", "chunks", ...}`.

    A client that goes away stops the work at the next 30 s window.
    """
    state = state_of(request)
    engine, pool = state.ready_speech()
    options = _asr_options(request.query_params.get("options"))
    data = await _read_audio(request)
    from instance_agent import audio

    samples = await asyncio.to_thread(audio.decode, data)
    del data
    gone = threading.Event()
    watcher = asyncio.create_task(_set_on_disconnect(request, gone))
    try:

        def work() -> dict[str, Any]:
            try:
                return engine.transcribe(samples, options, gone.is_set)
            except AgentError:
                raise
            except Exception as exc:
                logger.exception("transcription failed")
                raise GenerationFailed(f"transcription failed ({type(exc).__name__})") from exc

        result = await pool.run(work)
    finally:
        gone.set()
        watcher.cancel()
    return JSONResponse(result)


async def handle(request: Request) -> Response:
    """`POST /handle <any JSON>`: call the project's handler; `{"output", "time_seconds"}`."""
    state = state_of(request)
    payload = await _read_json(request)
    pool = state.ready_handler()
    return Response(await pool.call(payload), media_type="application/json")


async def configure(request: Request) -> Response:
    """`PUT /config {"concurrency": n}`: a repeated load changed the instance's concurrency."""
    state = state_of(request)
    if state.batcher is None:
        raise ModelLoading()
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:
        raise InvalidJson() from exc
    value = body.get("concurrency") if isinstance(body, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY:
        raise InvalidParams(f"concurrency must be an integer from 1 to {MAX_CONCURRENCY}")
    state.batcher.reconfigure(value)
    return JSONResponse({"concurrency": value})


def _ndjson_line(payload: StreamText | StreamDone | StreamError) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode() + b"\n"


async def _ndjson_events(row: Row) -> AsyncIterator[bytes]:
    while True:
        event = await row.channel.receive()
        if isinstance(event, TextChunk):
            yield _ndjson_line({"text": event.text})
        elif isinstance(event, Finished):
            done: StreamDone = {
                "done": True,
                "tokens_generated": event.tokens_generated,
                "time_seconds": round(event.time_seconds, 6),
                "tokens_per_second": round(event.tokens_per_second, 3),
                "prompt_tokens": event.prompt_tokens,
                "finish_reason": event.finish_reason,
            }
            yield _ndjson_line(done)
            return
        elif isinstance(event, Failed):
            yield _ndjson_line({"error": event.message, "code": GenerationFailed.code})
            return


class _RowStreamResponse(StreamingResponse):
    """Streams a row's events and frees its place however the response ends (a client gone)."""

    def __init__(self, row: Row, batcher: Batcher) -> None:
        super().__init__(_ndjson_events(row), media_type=NDJSON_MEDIA_TYPE)
        self._row = row
        self._batcher = batcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._row.done:
                self._batcher.cancel(self._row)


async def stream(request: Request) -> Response:
    """Generate an answer and stream it as NDJSON lines while the tokens come."""
    row, batcher = await _admit(request)
    return _RowStreamResponse(row, batcher)


async def health(request: Request) -> Response:
    """Report loading, or readiness with load, memory and batching figures."""
    state = state_of(request)
    config = state.config
    renew = parse_lease_s(request.headers.get(LEASE_HEADER))
    if state.lease is not None and renew is not None:
        state.lease.renew(renew, time.monotonic())
    if state.status != "ready" or state.engine is None or state.batcher is None:
        waiting: HealthLoading = {
            "status": "failed" if state.status == "failed" else "loading",
            "model": config.model_name,
            "model_loaded": False,
            "note": HEALTH_NOTE_FAILED if state.status == "failed" else HEALTH_NOTE_LOADING,
        }
        return JSONResponse(waiting, status_code=503)
    load = state.batcher.load()
    body: HealthReady = {
        "status": "healthy",
        "model": config.model_name,
        "model_loaded": True,
        "note": HEALTH_NOTE_READY,
        "task": state.task,
        "concurrency": state.batcher.concurrency,
        "maxQueue": config.max_queue,
        "inFlight": load.in_flight,
        "queued": load.queued,
        "loadSeconds": round(state.load_seconds, 3),
        "device": state.engine.device,
        "contextLength": state.engine.context_tokens,
        "memory": state.memory.sample(),
        "stats": {
            "batches": load.batches,
            "maxBatchSize": load.max_batch_size,
            "requests": load.requests,
        },
    }
    if state.grpc_port is not None:
        body["grpcPort"] = state.grpc_port
    if state.engine_name is not None:
        body["engine"] = state.engine_name
    return JSONResponse(body)


def _error_response(error: AgentError) -> Response:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s else None
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


async def _on_agent_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AgentError)
    return _error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _error_response(MethodNotAllowed())
    if exc.status_code == 404:
        return _error_response(NotFound())
    body = {"error": str(exc.detail), "code": "http_error"}
    return JSONResponse(body, status_code=exc.status_code)


async def _on_unexpected_error(request: Request, exc: Exception) -> Response:
    # The cause is logged by the server; it may hold paths, so it never reaches the client.
    return _error_response(InternalError())


def serves_grpc(config: AgentConfig) -> bool:
    """Whether the agent serves a handler project with a `.proto` (read from its spec)."""
    if config.task not in (None, "handler") or config.gguf_file is not None:
        return False
    if config.task is None and not (config.model_dir / HANDLER_SPEC_FILE).is_file():
        return False
    from instance_agent.user_code import read_project_spec

    try:
        return read_project_spec(config.model_dir).protobuf_path is not None
    except LoadFailed:
        return False  # not a handler project, or a broken one: the load says why


def _log_load_failure(reason: str) -> None:
    logger.error("load failed: %s", reason)


def _exit_gracefully() -> None:
    # As a SIGTERM from the runtime would: uvicorn drains and the lifespan stops the batcher.
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(
    config: AgentConfig,
    *,
    on_load_failed: Callable[[str], None] = _log_load_failure,
    grpc_host: str = "127.0.0.1",
) -> Starlette:
    """Build the agent app; the model starts loading when the app starts (lifespan)."""
    state = AgentState(config, on_load_failed)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Mapping[str, object]]:
        grpc_server = None
        if serves_grpc(config):
            from instance_agent.grpc_server import AgentGrpcServer

            # Bound before the load starts, so /health can report the port from the first
            # ready answer; calls get UNAVAILABLE until the handler is loaded.
            grpc_server = AgentGrpcServer(state, grpc_host)
            await grpc_server.start()
        loader = threading.Thread(target=state.load, name="mlcp-model-loader", daemon=True)
        loader.start()
        lease_watch: asyncio.Task[None] | None = None
        initial = parse_lease_s(os.environ.get(LEASE_ENV))
        if initial is not None:
            state.lease = Lease(initial, time.monotonic())
            lease_watch = asyncio.create_task(
                watch(state.lease, time.monotonic, _exit_gracefully), name="mlcp-agent-lease"
            )
        try:
            yield {}
        finally:
            if lease_watch is not None:
                lease_watch.cancel()
            state.begin_shutdown()
            if grpc_server is not None:
                await grpc_server.stop()
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop, 2.0)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/run", run, methods=["POST"]),
            Route("/config", configure, methods=["PUT"]),
            Route("/stream", stream, methods=["POST"]),
            Route("/chat", chat, methods=["POST"]),
            Route("/embed", embed, methods=["POST"]),
            Route("/handle", handle, methods=["POST"]),
            Route("/transcribe", transcribe, methods=["POST"]),
        ],
        exception_handlers={
            AgentError: _on_agent_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected_error,
        },
        lifespan=lifespan,
    )
    app.state.agent = state
    return app
