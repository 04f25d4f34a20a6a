"""The agent's HTTP app: /health, /run and /stream over one model, loaded once in the background.

The app answers /health from the first moment (503 "loading"), loads the model on a daemon thread
so a SIGTERM never waits for a load, and then serves through the batcher. torch is imported only
by the loader thread (`instance_agent.model`), so importing this module stays light.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from instance_agent.batcher import Batcher
from instance_agent.memory import MemoryMonitor
from instance_agent.protocol import (
    DEFAULT_MAX_NEW_TOKENS_CAP,
    MAX_BODY_BYTES,
    NDJSON_MEDIA_TYPE,
    AgentError,
    GenerationFailed,
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
from instance_agent.streaming import EventChannel, Failed, Finished, Row, TextChunk
from instance_agent.weights import check_model_dir

if TYPE_CHECKING:
    from instance_agent.model import TransformersEngine

logger = logging.getLogger(__name__)

# The control plane's own bound on a load's concurrency.
MAX_CONCURRENCY = 64

# A body over the limit is still read (and dropped) up to this much, so the client gets its 413
# instead of a connection reset while it is still writing.
_DRAIN_LIMIT_BYTES = 16 * MAX_BODY_BYTES


@dataclass(frozen=True)
class AgentConfig:
    """What the agent serves and how."""

    model_dir: Path
    model_name: str
    gguf_file: str | None = None
    concurrency: int = 1
    max_queue: int = 0
    device: str = "cpu"
    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
    # Testing aid: slows every decoding step so tests can observe requests in flight.
    step_delay_s: float = 0.0


class AgentState:
    """The model slot: loading, then ready (engine and batcher), or failed."""

    def __init__(self, config: AgentConfig, on_load_failed: Callable[[str], None]) -> None:
        self.config = config
        self.status: Literal["loading", "ready", "failed"] = "loading"
        self.engine: TransformersEngine | None = None
        self.batcher: Batcher | None = None
        self.load_seconds = 0.0
        self.memory = MemoryMonitor(gpu=config.device.startswith("cuda"))
        self._on_load_failed = on_load_failed
        self._shutting_down = False

    def load(self) -> None:
        """Load the model (blocking; runs on the loader thread) and start the batcher."""
        started = time.monotonic()
        try:
            # Refuse a bad directory before spending seconds importing torch.
            check_model_dir(self.config.model_dir, self.config.gguf_file)
            from instance_agent import model

            engine = model.load_engine(
                self.config.model_dir,
                gguf_file=self.config.gguf_file,
                device=self.config.device,
                step_delay_s=self.config.step_delay_s,
                on_step=self.memory.sample,
            )
        except LoadFailed as exc:
            self._fail(exc.message)
            return
        except Exception as exc:
            logger.exception("loading the model failed")
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        batcher = Batcher(
            engine, concurrency=self.config.concurrency, max_queue=self.config.max_queue
        )
        batcher.start()
        self.engine, self.batcher = engine, batcher
        self.load_seconds = time.monotonic() - started
        self.memory.sample()
        self.status = "ready"
        if self._shutting_down:
            batcher.stop(timeout_s=0)
        logger.info("model %s ready in %.1f s", self.config.model_name, self.load_seconds)

    def _fail(self, reason: str) -> None:
        self.status = "failed"
        self._on_load_failed(" ".join(reason.split()))

    def begin_shutdown(self) -> None:
        """Abort generation at once; never blocks, so a signal watcher may call it."""
        self._shutting_down = True
        if self.batcher is not None:
            self.batcher.stop(timeout_s=0)

    def ready(self) -> tuple[TransformersEngine, Batcher]:
        """Return the engine and batcher, or raise `ModelLoading`."""
        if self.status != "ready" or self.engine is None or self.batcher is None:
            raise ModelLoading()
        return self.engine, self.batcher


def _state(request: Request) -> AgentState:
    return cast(AgentState, request.app.state.agent)


async def _read_run_request(request: Request, config: AgentConfig) -> RunRequest:
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
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:
        raise InvalidJson() from exc
    return validate_run_body(body, max_new_tokens_cap=config.max_new_tokens_cap)


async def _admit(request: Request) -> tuple[Row, Batcher]:
    state = _state(request)
    run_request = await _read_run_request(request, state.config)
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


async def run(request: Request) -> Response:
    """Generate a whole answer and return it as one JSON body."""
    row, batcher = await _admit(request)
    collecting = asyncio.ensure_future(_collect(row))
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({collecting, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if not collecting.done():
            # Nobody will read this answer; free the row's place in its batch.
            return Response(status_code=499)
        output, finished = collecting.result()
    finally:
        for task in (collecting, disconnect):
            task.cancel()
        if not row.done:
            batcher.cancel(row)
    body: RunResponse = {
        "output": output,
        "tokens_generated": finished.tokens_generated,
        "time_seconds": round(finished.time_seconds, 6),
        "tokens_per_second": round(finished.tokens_per_second, 3),
    }
    return JSONResponse(body)


async def configure(request: Request) -> Response:
    """`PUT /config {"concurrency": n}`: a repeated load changed the instance's concurrency."""
    state = _state(request)
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
    state = _state(request)
    config = state.config
    if state.status != "ready" or state.engine is None or state.batcher is None:
        return JSONResponse({"status": state.status, "model": config.model_name}, status_code=503)
    load = state.batcher.load()
    body: HealthReady = {
        "status": "ready",
        "model": config.model_name,
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


def _log_load_failure(reason: str) -> None:
    logger.error("load failed: %s", reason)


def create_app(
    config: AgentConfig,
    *,
    on_load_failed: Callable[[str], None] = _log_load_failure,
) -> Starlette:
    """Build the agent app; the model starts loading when the app starts (lifespan)."""
    state = AgentState(config, on_load_failed)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Mapping[str, object]]:
        loader = threading.Thread(target=state.load, name="mlcp-model-loader", daemon=True)
        loader.start()
        try:
            yield {}
        finally:
            state.begin_shutdown()
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop, 2.0)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/run", run, methods=["POST"]),
            Route("/config", configure, methods=["PUT"]),
            Route("/stream", stream, methods=["POST"]),
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


def agent_state(app: Starlette) -> AgentState:
    """The typed state of an app made by `create_app`."""
    return cast(AgentState, app.state.agent)
