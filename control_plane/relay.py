"""Relaying one request to an instance agent and its answer back to the client.

Every route that runs a model comes through here: `call` for a JSON answer, `open_stream` then
`TextStream` or `EventStream` for a streamed one. Both keep the instance's in-flight count (which
protects it from the reaper and from eviction), cancel the upstream request when the client goes
away, count requests the instance refused as busy, and have the supervisor check an instance
that failed mid-request. `proxy.py` is the wire underneath (over `agent_http`; the agent's NDJSON
events).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from control_plane import proxy
from control_plane.agent_http import AgentHttpError, AgentResponse
from control_plane.errors import InstanceBusy, InstanceFailed, InstanceTimeout
from control_plane.state import AppState
from control_plane.supervisor import Route

STREAM_FAILED = "the model instance failed mid-stream"
# What a response says when the client left before it was written (nginx's convention).
CLIENT_CLOSED = 499

# What one agent read becomes: the text that arrived, and the last event when the stream ended
# ({"done": True, ...stats} or {"error": message, "code": code}).
Piece = tuple[str, dict[str, Any] | None]


class CancelOnDisconnect:
    """Cancels the running task when the client disconnects inside the block; then says so.

    Where `receive` can say when the client leaves (`on_disconnect`, the fast lane's), it is
    told to call back; otherwise one watcher task per request waits on `receive`. Running the
    upstream call as a second task and waiting on both with asyncio.wait cost 23 us per request
    against 12 us for the watcher (uvloop, 2 cores here), and it is the shape asyncio.timeout()
    uses: cancel the task, then take the cancellation back.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._active = True
        self.disconnected = False
        self._watcher: asyncio.Future[None] | None = None
        self._unhook: Callable[[], None] | None = None

    def __enter__(self) -> CancelOnDisconnect:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        hook: Callable[[Callable[[], None]], Callable[[], None]] | None = getattr(
            self._receive, "on_disconnect", None
        )
        if hook is not None:
            self._unhook = hook(self._left)
        else:
            self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._left()

    def _left(self) -> None:
        if self._active:
            self._active = False
            self.disconnected = True
            self._task.cancel()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> bool:
        self._active = False
        if self._watcher is not None:
            self._watcher.cancel()
        if self._unhook is not None:
            self._unhook()
        # Swallow only our own cancellation, never one asked for by someone else too.
        return (
            self.disconnected and self._task.uncancel() == 0 and exc_type is asyncio.CancelledError
        )


def _no_progress(state: AppState) -> str:
    return (
        "the model instance made no progress (it stopped answering health checks) for "
        f"{state.supervisor.progress_timeout_s:g} s"
    )


def _count_failure(state: AppState, route: Route, exc: BaseException) -> None:
    if isinstance(exc, proxy.InstanceGone):
        state.supervisor.request_failed(route.instance_id)
    elif isinstance(exc, InstanceBusy):
        state.activity.reject(route.instance_id)


async def call(
    state: AppState,
    route: Route,
    payload: dict[str, Any] | bytes,
    receive: Receive,
    path: str = "/run",
) -> Any | None:
    """POST `payload` to the agent and return its JSON answer; None if the client left."""
    state.activity.begin(route.instance_id)
    completed = False
    try:
        answer = None
        # The client left: cancelling closes the upstream connection, which stops generation.
        with CancelOnDisconnect(receive) as guard:
            try:
                try:
                    async with state.supervisor.progress_watch(route.instance_id):
                        answer = await proxy.run(state.agents, route.endpoint, payload, path)
                except TimeoutError as exc:  # only the watch raises it; proxy.run translates
                    raise InstanceTimeout(_no_progress(state)) from exc
            except BaseException as exc:
                _count_failure(state, route, exc)
                raise
        if guard.disconnected:
            return None
        completed = True
        if isinstance(answer, dict):
            state.metrics.tokens(
                route.model, answer.get("prompt_tokens"), answer.get("tokens_generated")
            )
        return answer
    finally:
        state.activity.end(route.instance_id, completed=completed)


class Upstream:
    """An open agent stream and the request it serves: `finish` closes both, exactly once.

    The responses call it in a `finally` too, because a relay generator closed before its first
    step never runs its own `finally`, and the request would stay in flight (never reaped).
    """

    def __init__(
        self,
        state: AppState,
        route: Route,
        resp: AgentResponse,
        on_finish: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        self.route = route
        self.resp = resp
        self._on_finish = on_finish
        self._finished = False
        self.opened_at = time.perf_counter()

    def finish(self, *, completed: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if completed:
            self.resp.release()
        else:
            self.resp.close()
        self.state.activity.end(self.route.instance_id, completed=completed)
        if self._on_finish is not None:
            self._on_finish()


async def open_stream(
    state: AppState,
    route: Route,
    payload: dict[str, Any],
    path: str = "/stream",
    on_finish: Callable[[], None] | None = None,
) -> Upstream:
    """Open the agent's stream once it accepted the request; errors before it are raised.

    `on_finish` runs once when the stream ends, however it ends (a key's open-stream count).
    """
    state.activity.begin(route.instance_id)
    try:
        try:
            async with state.supervisor.progress_watch(route.instance_id):
                resp = await proxy.open_stream(state.agents, route.endpoint, payload, path)
        except TimeoutError as exc:  # only the watch raises it; proxy translates its own
            raise InstanceTimeout(_no_progress(state)) from exc
    except BaseException as exc:
        state.activity.end(route.instance_id, completed=False)
        _count_failure(state, route, exc)
        raise
    return Upstream(state, route, resp, on_finish)


async def pieces(upstream: Upstream) -> AsyncGenerator[Piece, None]:
    """A piece per agent read; the last one carries 'done' or an error. Finishes upstream.

    Each read is watched like a unary request (Supervisor.progress_watch): a stream whose
    instance stopped answering health checks ends with an `instance_timeout` error piece after
    `progress_timeout_s`, its status long sent, rather than hanging until the kill.
    """
    completed = False
    state = upstream.state
    metrics, model = state.metrics, upstream.route.model
    watch = state.supervisor.progress_watch
    batches = proxy.event_batches(upstream.resp)
    first = True
    try:
        while True:
            try:
                async with watch(upstream.route.instance_id) as deadline:
                    batch = await anext(batches)
            except StopAsyncIteration:
                break
            except TimeoutError:
                if not deadline.expired():
                    raise  # the agent connection's own read timeout: handled below
                error = {"error": _no_progress(state), "code": InstanceTimeout.code}
                upstream.finish(completed=False)
                yield "", error
                return
            texts: list[str] = []
            if first:
                first = False
                metrics.first_token(model, time.perf_counter() - upstream.opened_at)
            for event in batch:
                if "text" in event:
                    texts.append(str(event["text"]))
                elif event.get("done"):
                    completed = True
                    metrics.tokens(model, event.get("prompt_tokens"), event.get("tokens_generated"))
                    yield "".join(texts), event
                    return
                elif "error" in event:
                    error = {"error": str(event["error"]), "code": str(event.get("code", "error"))}
                    yield "".join(texts), error
                    return
            if texts:
                yield "".join(texts), None
    except (AgentHttpError, TimeoutError):
        pass
    finally:
        upstream.finish(completed=completed)
    # The agent ended the stream without 'done', or the connection broke: it died or hung.
    # Reported before the last piece is yielded: the consumer stops reading once it has it.
    upstream.state.supervisor.request_failed(upstream.route.instance_id)
    yield "", {"error": STREAM_FAILED, "code": InstanceFailed.code}


class TextStream(Response):
    """Raw text chunks, one per agent read; a failure ends the stream with a line saying so.

    Plain ASGI rather than StreamingResponse over two stacked generators: one generator step
    per chunk instead of two, one disconnect watcher instead of an anyio task group, and the
    generator is closed here rather than whenever it is collected.
    """

    media_type = "text/plain; charset=utf-8"

    def __init__(self, upstream: Upstream) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers()
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with contextlib.aclosing(pieces(self._upstream)) as stream:
                with CancelOnDisconnect(receive):
                    await self._relay(stream, send)
        finally:
            self._upstream.finish(completed=False)

    async def _relay(self, stream: AsyncIterator[Piece], send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for text, last in stream:
            if last is not None and "error" in last:
                text += f"\n[error: {last['code']}] {last['error']}\n"
            elif last is None and not text:
                continue
            # The last piece ends the response in the same write.
            body = {"type": "http.response.body", "body": text.encode(), "more_body": last is None}
            await send(body)
            if last is not None:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# Turns the pieces of one stream into server-sent events ({"data": ..., "event": ...} dicts);
# a list of them is written at once (one write, one read for the client).
Event = dict[str, str]
EventRenderer = Callable[[AsyncIterator[Piece]], AsyncGenerator[Event | list[Event], None]]


# A comment line every PING_S while a stream is open, so proxies and clients that drop silent
# connections keep it through a long prefill (sse-starlette's default interval).
PING_S = 15.0
PING = b": ping\r\n\r\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
SSE_HEADERS = {"Cache-Control": "no-store", "Connection": "keep-alive", "X-Accel-Buffering": "no"}


def encode_event(event: Mapping[str, str]) -> bytes:
    """One server-sent event: its `event` name, then a `data:` line per line of its data."""
    data = event.get("data", "")
    if "event" not in event and "\n" not in data and "\r" not in data:
        return ("data: " + data + "\r\n\r\n").encode()  # a JSON chunk: one line
    out = ""
    if "event" in event:
        out += "event: " + _LINE_BREAK.sub("", event["event"]) + "\r\n"
    for line in _LINE_BREAK.split(event.get("data", "")):
        out += "data: " + line + "\r\n"
    return (out + "\r\n").encode()


class EventStream(Response):
    """Server-sent events of one agent stream, in the shape `render` gives them.

    Plain ASGI, as TextStream: sse-starlette's response ran each event through an anyio task
    group, a cancel scope per send and a ping task, which cost the relay ~30% of its CPU per
    streamed token (/v1/chat/completions, benchmarks/bench_openai.py). The wire is the same:
    CRLF-separated lines, a `: ping` comment every PING_S.
    """

    media_type = "text/event-stream"

    def __init__(self, upstream: Upstream, render: EventRenderer) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)
        self._upstream = upstream
        self._render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # Both generators are closed here, the renderer first: closing `pieces` after its
            # last piece is what gives a completed stream's agent connection back for reuse;
            # left to the `finally` below it was closed (and the next request connected anew).
            async with (
                contextlib.aclosing(pieces(self._upstream)) as stream,
                contextlib.aclosing(self._render(stream)) as events,
            ):
                with CancelOnDisconnect(receive):
                    await self._relay(events, send)
        finally:
            self._upstream.finish(completed=False)

    async def _relay(self, events: AsyncGenerator[Event | list[Event], None], send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        ping = asyncio.ensure_future(_ping(send))
        try:
            async for event in events:
                if isinstance(event, list):
                    body = b"".join([encode_event(e) for e in event])
                else:
                    body = encode_event(event)
                await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            ping.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _ping(send: Send) -> None:
    while True:
        await asyncio.sleep(PING_S)
        await send({"type": "http.response.body", "body": PING, "more_body": True})
