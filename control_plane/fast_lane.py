"""The routes that run models, served by their endpoints without Starlette's stack in between.

A `POST` to one of `metrics.ROUTES` (/model/run, /v1/chat/completions, /v1/completions,
/v1/embeddings, /chat) or to a deployed API (`/{api}`, `/{owner}/{api}`) is where a user waits on
the control plane, so uvicorn's protocol hands it straight to the route's own endpoint
function: the same `Request`, the same `receive` and `send`, the same exception handlers, the
same request metrics, but not the four ASGI layers (error middleware, metrics middleware,
exception middleware, router) each request otherwise passes through twice. An API's path is
the lane's only when its first segment is no other route's (as the router would find it). A
whole answer (a `JSONResponse`) is written as one write of status line, headers and body instead
of two ASGI messages. Streams are sent by their own ASGI `__call__` as
before. Every other request goes through the Starlette app unchanged.

Measured on a 2-core box, two control planes side by side with one fast fake agent each, their
requests alternating, in both orders: /model/run's added p50 was 0.04-0.19 ms lower with the
lane (0.39-0.56 ms against 0.44-0.82 ms, in a slow hour), and its CPU per request ~60 us less.

`FastLaneProtocol` is uvicorn's httptools protocol (with http_guard's limits); the only seam it
uses is where uvicorn starts the task of a request (`_start_asgi_task`, uvicorn 0.55), so
keep-alive, pipelining, 100-continue, flow control, disconnects and graceful shutdown stay
uvicorn's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from control_plane.http_guard import GuardedHttpToolsProtocol, HttpLimits
from control_plane.metrics import MODEL_SCOPE_KEY, ROUTES, Metrics

logger = logging.getLogger(__name__)

# The key of the lane in the lifespan's state (uvicorn gives the protocol that dict).
LANE_KEY = "mlcp.fast_lane"

Endpoint = Callable[[Request], Awaitable[Response]]
ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]
# Responses whose whole body is in `body`: written at once (unless they have a background task
# to run after it). A subclass may send differently.
_WHOLE = (Response, JSONResponse)


class FastLane:
    """The hot routes' endpoints, the app's exception handlers and the request metrics."""

    def __init__(
        self,
        routes: Iterable[BaseRoute],
        handlers: Mapping[Any, ExceptionHandler],
        metrics: Metrics | None,
        api_routes: Iterable[BaseRoute] = (),
    ) -> None:
        """`api_routes`: the routes of `routes` that match by shape (`/{api}`), tried last."""
        api = list(api_routes)
        self.endpoints: dict[str, Endpoint] = {}
        # The first path segment of every other route: a path starting with one of them is
        # never an API's, whatever its method (the router may answer it 405).
        self._taken: set[str] = set()
        for route in routes:
            if route in api:
                continue
            first = str(getattr(route, "path", "")).split("/")[1:2] or [""]
            if "{" in first[0]:
                raise ValueError(f"only the API routes may start with a parameter: {route}")
            self._taken.add(first[0])
            if (
                isinstance(route, Route)
                and route.path in ROUTES
                and "POST" in (route.methods or ())
                and route.path not in self.endpoints
            ):
                self.endpoints[route.path] = route.endpoint
        self._api = [r for r in api if isinstance(r, Route) and "POST" in (r.methods or ())]
        self._handlers: dict[Any, ExceptionHandler] = dict(handlers)
        if Exception not in self._handlers:
            raise ValueError("the lane needs a handler for Exception, as the app has")
        self._metrics = metrics
        # The app, for what a request may ask of it (`request.app`): set once it is made.
        self.app: Any = None

    def endpoint_for(self, scope: dict[str, Any]) -> Endpoint | None:
        """The endpoint a POST is for, its path parameters put in `scope`; None: not the lane's."""
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        endpoint = self.endpoints.get(path)
        if endpoint is not None or path[1:].partition("/")[0] in self._taken:
            return endpoint
        for route in self._api:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope["path_params"] = {**scope.get("path_params", {}), **child["path_params"]}
                scope["endpoint"] = child["endpoint"]
                return route.endpoint
        return None

    def _handler_for(self, exc: Exception) -> ExceptionHandler:
        # As Starlette looks one up: the nearest class in the exception's MRO.
        for cls in type(exc).__mro__:
            handler = self._handlers.get(cls)
            if handler is not None:
                return handler
        return self._handlers[Exception]

    async def serve(self, cycle: RequestResponseCycle, endpoint: Endpoint) -> None:
        """Answer one request; a failure after its answer started closes the connection."""
        scope: dict[str, Any] = cycle.scope  # type: ignore[assignment]
        scope["app"] = self.app
        started = time.perf_counter()
        status = 0
        try:
            receive = LaneReceive(cycle)
            request = Request(scope, receive, cycle.send)  # type: ignore[arg-type]
            try:
                response = await endpoint(request)
            except Exception as exc:
                response = await self._handler_for(exc)(request, exc)
            status = response.status_code
            if type(response) in _WHOLE and response.background is None:
                if not cycle.disconnected:
                    write_whole(cycle, response)
            else:
                try:
                    await response(scope, receive, cycle.send)  # type: ignore[arg-type]
                except Exception as exc:
                    if cycle.response_started:
                        raise
                    response = await self._handler_for(exc)(request, exc)
                    status = response.status_code
                    write_whole(cycle, response)
        except BaseException as exc:
            logger.error("exception answering %s %s", scope["method"], scope["path"], exc_info=exc)
            if not cycle.response_started and not cycle.disconnected:
                await cycle.send_500_response()
                status = 500
            else:
                cycle.transport.close()
        finally:
            cycle.on_response = lambda: None
            if self._metrics is not None and scope["path"] in ROUTES:
                model = scope.get(MODEL_SCOPE_KEY) or "unknown"
                # No answer started: the client left first (nginx's 499).
                seconds = time.perf_counter() - started
                self._metrics.request(str(model), scope["path"], status or 499, seconds)


# The attribute of a lane request's cycle that holds what to call when its client leaves.
_ON_LOST = "mlcp_on_lost"


class LaneReceive:
    """The cycle's ASGI `receive`, which also says when the client leaves (`on_disconnect`).

    relay.CancelOnDisconnect uses it instead of a watcher task per request: the protocol's
    `connection_lost` calls back. A request has one or two such blocks at a time.
    """

    __slots__ = ("_cycle",)

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle

    def __call__(self) -> Awaitable[Any]:
        return self._cycle.receive()

    def on_disconnect(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` once the client has left (soon, if it has); returns the undo."""
        cycle = self._cycle
        if cycle.disconnected:
            return asyncio.get_running_loop().call_soon(callback).cancel
        waiting: list[Callable[[], None]] | None = getattr(cycle, _ON_LOST, None)
        if waiting is None:
            waiting = []
            setattr(cycle, _ON_LOST, waiting)
        waiting.append(callback)

        def undo() -> None:
            if callback in waiting:
                waiting.remove(callback)

        return undo


def client_left(cycle: RequestResponseCycle | None) -> None:
    """Tell a lane request's blocks that its client left (from `connection_lost`)."""
    waiting: list[Callable[[], None]] | None = getattr(cycle, _ON_LOST, None)
    if waiting:
        for callback in list(waiting):
            callback()
        waiting.clear()


def write_whole(cycle: RequestResponseCycle, response: Response) -> None:
    """What `cycle.send` does for a start and a whole body, in one write.

    The headers are our own (Starlette's `init_headers` and the routes'), so uvicorn's checks of
    each name and value for characters that would split the response are not repeated.
    """
    if cycle.response_started:
        raise RuntimeError("a response was already started for this request")
    body = response.body
    parts = [STATUS_LINE[response.status_code]]
    for name, value in cycle.default_headers:
        parts += (name, b": ", value, b"\r\n")
    for name, value in response.raw_headers:
        if name == b"connection" and b"close" in value.lower():
            cycle.keep_alive = False
        parts += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (b"\r\n", bytes(body))
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(b"".join(parts))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


class FastLaneProtocol(GuardedHttpToolsProtocol):
    """uvicorn's protocol with http_guard's limits, starting hot requests on the lane."""

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:
            client_left(cycle)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        lane = self.app_state.get(LANE_KEY)
        # `app` is uvicorn's 503 app when its concurrency limit is reached: that answer stands.
        endpoint = None
        if isinstance(lane, FastLane) and app is self.app:
            endpoint = lane.endpoint_for(cycle.scope)  # type: ignore[arg-type]
        if lane is None or endpoint is None:
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(lane.serve(cycle, endpoint))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)


def fast_lane(limits: HttpLimits) -> type[FastLaneProtocol]:
    """The protocol class for uvicorn's `http=` option, with these limits."""
    return type("FastLaneProtocol", (FastLaneProtocol,), {"limits": limits})


def server_config(app: Any, limits: HttpLimits, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn Config serving `app` with `limits` (keep-alive idle time included) and the lane."""
    return uvicorn.Config(
        app, http=fast_lane(limits), timeout_keep_alive=max(1, int(limits.idle_s)), **kwargs
    )
