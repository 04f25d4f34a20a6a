"""The control plane's gRPC port (`MLCP_GRPC_PORT`): handler APIs with a `.proto`, relayed.

One generic handler takes every call by its full method name (`/pkg.Service/Method`), finds the
API serving `pkg.Service` (`grpc_services.ServiceTable`) and relays the request bytes to that
API's instance and the reply bytes back, never decoding them: the instance (the user's generated
code) is the only place that knows the messages. The call has the lifecycle of an HTTP call:

- the key comes from the `authorization` metadata (`Key <key>` or `Bearer <key>`) or
  `x-api-key`, checked by `auth.Authenticator`; another owner's private API is NOT_FOUND;
- a cold API loads on the first call through `loading.route_to` (the one load path) and the
  call waits for it within its deadline (at most `COLD_WAIT_S`, or `prefer: wait=N`);
- the call counts as in flight on the instance (`Activity`), which blocks reaping and eviction
  and slides the expiry when it ends;
- the client's deadline goes upstream as the upstream call's timeout, and a client cancel
  cancels the upstream call.

Errors become gRPC statuses by meaning (`status_for`); the instance's own statuses (INTERNAL
with the handler's exception, RESOURCE_EXHAUSTED with `retry-after`) pass through. Server
reflection lists the served services, and `grpc.health.v1` answers SERVING for each.

The port itself is `grpc_relay`'s, which passes HTTP/2 frames through: a call to a warm API the
key may call goes straight to the instance's gRPC port (`GrpcFront.decide` admits it; `_Admitted`
ends it); every other call (cold, refused, unknown, reflection, health) goes to this module's
grpc.aio server on a loopback port of its own, which answers it as described above.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from starlette.datastructures import Headers

from control_plane import grpc_relay, grpc_services
from control_plane.auth import Principal
from control_plane.errors import (
    BenchmarkFailed,
    CapacityFull,
    Forbidden,
    InstanceBusy,
    InstanceError,
    InstanceStopping,
    InstanceTimeout,
    Invalid,
    MlcpError,
    NotBenchmarked,
    NotFound,
    NotLoaded,
    TooManyRequests,
    Unauthorized,
    Unavailable,
)
from control_plane.grpc_services import ProjectCompiler, ServedService, ServiceTable
from control_plane.loading import OnDemand, cold_wait_s, route_to
from control_plane.quotas import Ticket
from control_plane.state import AppState
from control_plane.supervisor import Route
from db import queries
from instance_agent.client import AgentClient, AgentNotReady, AgentUnreachable

logger = logging.getLogger(__name__)

# A call without a deadline waits this long for a cold API to load (a deadline waits less).
COLD_WAIT_S = 60.0
_HEALTH_TIMEOUT_S = 2.0
_GRACE_S = 1.0
_BUILT_IN = (reflection.SERVICE_NAME, health.SERVICE_NAME)
# Upstream calls carry the bytes as they came: no serializers on either side.
_Unary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
_Stream = grpc.aio.UnaryStreamMultiCallable[bytes, bytes]


def status_for(error: MlcpError) -> grpc.StatusCode:
    """The gRPC status that means what `error` means (the issue's mapping)."""
    if isinstance(error, Unauthorized):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, Forbidden):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(error, NotLoaded | InstanceStopping | InstanceError | CapacityFull):
        # The API exists; its instance failed, is going, died or has no room now.
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, NotBenchmarked | BenchmarkFailed | Invalid):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, InstanceBusy | TooManyRequests):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, InstanceTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def metadata_headers(metadata: Any) -> Headers:
    """The call's metadata as the headers `Authenticator` reads (binary entries left out)."""
    pairs = [(str(k).lower(), v) for k, v in (metadata or ()) if isinstance(v, str) and k.isascii()]
    return Headers(raw=[(k.encode(), v.encode("latin-1", "replace")) for k, v in pairs])


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    retry_after: str | None = None,
) -> None:
    if retry_after:
        context.set_trailing_metadata((("retry-after", retry_after),))
    await context.abort(code, message)


def _retry_after(error: grpc.aio.AioRpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after" and isinstance(value, str):
            return value
    return None


class _DynamicReflection(ReflectionServicer):
    """grpcio's reflection servicer, whose services and descriptors change with the table."""

    def serve(self, names: tuple[str, ...], pool: descriptor_pool.DescriptorPool) -> None:
        self._service_names = tuple(sorted(names))
        self._pool = pool


def _reflection_pool(entries: list[ServedService]) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    files: list[descriptor_pb2.FileDescriptorProto] = []
    for module in (health_pb2, reflection_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    for entry in entries:
        files.extend(descriptor_pb2.FileDescriptorSet.FromString(entry.descriptor_set).file)
    for proto in files:
        # protoc lists a file's imports before it, so adding in order always resolves.
        if proto.name not in added:
            added.add(proto.name)
            try:
                pool.Add(proto)
            except (TypeError, ValueError) as exc:  # two protos disagreeing on one file name
                logger.warning("reflection leaves out %s: %s", proto.name, exc)
    return pool


class GrpcFront:
    """The gRPC server of the control plane; started and stopped by the app's lifespan."""

    def __init__(self, state: AppState, table: ServiceTable) -> None:
        self._state = state
        self.table = table
        self.compiler = ProjectCompiler()
        self._channels: dict[int, _Upstream] = {}
        self._closing: set[asyncio.Task[None]] = set()
        limit = state.settings.grpc_max_message_bytes
        self._server = grpc.aio.server(
            options=(
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # grpcio sets SO_REUSEPORT by default: a second server on the same port would
                # bind too and take half the calls. A taken port must fail, as for HTTP.
                ("grpc.so_reuseport", 0),
            )
        )
        self._health = health.aio.HealthServicer()
        self._reflection = _DynamicReflection(_BUILT_IN)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
            self._reflection, self._server
        )
        self._server.add_generic_rpc_handlers((_Relay(self),))
        settings = state.settings
        # The grpc.aio server answers what the relay does not send straight to an instance.
        internal = self._server.add_insecure_port("127.0.0.1:0")
        self._relay = grpc_relay.GrpcRelay(
            _listen(settings.host, settings.grpc_port), self.decide, ("127.0.0.1", internal), limit
        )
        self.port = self._relay.port
        self._served_version = -1

    async def start(self) -> None:
        """Listen, with the services of the catalog's projects."""
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.refresh()
        await self._server.start()
        await self._relay.start()
        logger.info("gRPC on %s:%d", self._state.settings.host, self.port)

    async def stop(self) -> None:
        """Stop taking calls, end open ones after a grace period, close upstream channels."""
        await self._relay.stop(_GRACE_S)
        await self._server.stop(0.1)
        for upstream in self._channels.values():
            await upstream.channel.close()
        self._channels.clear()

    async def refresh(self) -> None:
        """Rebuild the service table from the catalog's handler projects."""
        rows = await queries.list_models(self._state.pool)
        projects = [
            # A deployed API (source "apis", `owner/name`) is its owner's; a project of
            # MLCP_MODEL_DIRS is everyone's.
            (
                row.name,
                Path(row.source_path),
                row.name.split("/", 1)[0] if row.source_kind == "apis" else None,
            )
            for row in rows
            if row.task == "handler" and row.source_path is not None
        ]
        table, refused = await grpc_services.build_table(self.compiler, projects)
        self.table.replace(table, refused)
        if self.table.version != self._served_version:
            self._served_version = self.table.version
            entries = list(table.values())
            self._reflection.serve((*_BUILT_IN, *table), _reflection_pool(entries))
            for name in table:
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.drop_idle_channels()

    def drop_idle_channels(self) -> None:
        """Close the channels of instances no call is routed to or running on (stopped,
        expired, replaced by a new version): one was kept per instance that ever had a call."""
        routed = self._state.supervisor.routed_instances()
        for instance_id in list(self._channels):
            if instance_id not in routed and not self._state.activity.in_flight(instance_id):
                self._close(self._channels.pop(instance_id))

    async def route(self, entry: ServedService, principal: Principal, wait_s: float) -> Route:
        """The API's instance, loading it if cold (on demand, as the HTTP routes do)."""
        state = self._state
        route = state.supervisor.route(entry.model)
        if route is not None:
            return route
        # The project's own spec says how busy and how long-lived its instance is.
        on_demand = OnDemand(
            principal.key_id,
            entry.concurrency,
            entry.expiration_s,
            state.limiter.limits_of(principal).max_instances,
        )
        return await route_to(state, entry.model, wait_s, on_demand)

    async def channel(self, route: Route) -> _Upstream:
        """The channel to the instance's gRPC port (which its /health reports), one per
        instance, opened at its first call and kept."""
        known = self._channels.get(route.instance_id)
        if known is not None:
            return known
        try:
            health = await AgentClient(self._state.session, _HEALTH_TIMEOUT_S).health(
                route.endpoint
            )
        except (AgentUnreachable, AgentNotReady) as exc:
            self._state.supervisor.request_failed(route.instance_id)
            raise InstanceError("the API's instance did not answer") from exc
        port = health.get("grpcPort")
        if not isinstance(port, int):
            raise InstanceError("the API's instance serves no gRPC (its project has no proto)")
        host = urlsplit(route.endpoint).hostname or "127.0.0.1"
        target = f"{host}:{port}"
        limit = self._state.settings.grpc_max_message_bytes
        channel = grpc.aio.insecure_channel(
            target,
            options=(
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # The front maps every upstream failure itself; grpcio's transparent retries
                # would only buffer each call (about 0.1 ms a call here).
                ("grpc.enable_retries", 0),
            ),
        )
        upstream = self._channels[route.instance_id] = _Upstream((host, port), channel)
        return upstream

    async def decide(self, path: str, fields: list[tuple[str, str]]) -> _Admitted | None:
        """Admit a call to a warm API straight to its instance (the relay's fast path), or None:
        the call goes to the grpc.aio server, which loads, refuses or answers it."""
        parts = grpc_services.split_method(path)
        entry = self.table.lookup(parts[0]) if parts else None
        streams = entry.methods.get(path) if entry is not None else None
        if entry is None or streams is None:
            return None
        state = self._state
        route = state.supervisor.route(entry.model)
        upstream = self._channels.get(route.instance_id) if route is not None else None
        if route is None or upstream is None:
            return None  # cold, or its first call: the grpc.aio path opens the channel
        headers = Headers(
            raw=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields if k[0] != ":"]
        )
        try:
            principal = await state.auth.authenticate(headers, "user")
            if not grpc_services.may_call(entry, principal):
                return None
            ticket = await state.limiter.admit(principal, stream=streams)
        except MlcpError:
            return None  # refused: the grpc.aio path says why, with the right status
        now = state.supervisor.route(entry.model)
        if now is None or now.instance_id != route.instance_id:
            ticket.refund()  # the instance went while the key was checked
            return None
        state.activity.begin(route.instance_id)
        return _Admitted(self, route, ticket, upstream.address)

    def forget(self, route: Route) -> None:
        """Drop the channel of an instance that failed a call (it may be gone)."""
        known = self._channels.pop(route.instance_id, None)
        if known is not None:
            self._close(known)
        self._state.supervisor.request_failed(route.instance_id)

    def _close(self, upstream: _Upstream) -> None:
        self._relay.drop(upstream.address)
        task = asyncio.ensure_future(upstream.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def state(self) -> AppState:
        return self._state


def _listen(host: str, port: int) -> socket.socket:
    """The gRPC port's listening socket; a port taken already is a RuntimeError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


class _Admitted:
    """A call the relay sends straight to the instance: in flight on it until it ends."""

    __slots__ = ("_front", "_route", "_ticket", "address")

    def __init__(
        self, front: GrpcFront, route: Route, ticket: Ticket, address: tuple[str, int]
    ) -> None:
        self._front = front
        self._route = route
        self._ticket = ticket
        self.address = address

    def ended(self, status: int | None) -> None:
        activity = self._front.state.activity
        instance_id = self._route.instance_id
        if status == grpc_relay.RESOURCE_EXHAUSTED:
            activity.reject(instance_id)  # the instance was full
        activity.end(instance_id, completed=status == 0)
        self._ticket.end_stream()

    def failed(self) -> None:
        self._front.forget(self._route)
        self._front.state.activity.end(self._route.instance_id, completed=False)
        self._ticket.end_stream()


class _Upstream:
    """One instance's channel and its callables by method (a callable is made once, not per
    call), and its gRPC address for the relay."""

    __slots__ = ("_streams", "_unaries", "address", "channel", "target")

    def __init__(self, address: tuple[str, int], channel: grpc.aio.Channel) -> None:
        self.address = address
        self.target = f"{address[0]}:{address[1]}"
        self.channel = channel
        self._unaries: dict[str, _Unary] = {}
        self._streams: dict[str, _Stream] = {}

    def unary(self, method: str) -> _Unary:
        known = self._unaries.get(method)
        if known is None:
            known = self._unaries[method] = cast("_Unary", self.channel.unary_unary(method))
        return known

    def stream(self, method: str) -> _Stream:
        known = self._streams.get(method)
        if known is None:
            known = self._streams[method] = cast("_Stream", self.channel.unary_stream(method))
        return known


class _Relay(grpc.GenericRpcHandler):
    """Answers every method of every served service; None (UNIMPLEMENTED) for the rest.

    The method handler of a method is made once per service-table entry and reused until the
    table serves the method from another entry (or not at all)."""

    def __init__(self, front: GrpcFront) -> None:
        self._front = front
        self._handlers: dict[str, tuple[ServedService, grpc.RpcMethodHandler[Any, Any]]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        parts = grpc_services.split_method(method)
        entry = self._front.table.lookup(parts[0]) if parts else None
        if entry is None or method not in entry.methods:
            return None
        known = self._handlers.get(method)
        if known is not None and known[0] is entry:
            return known[1]
        call = _Call(self._front, entry, method)
        handler: grpc.RpcMethodHandler[Any, Any] = (
            grpc.unary_stream_rpc_method_handler(call.stream)
            if entry.methods[method]
            else grpc.unary_unary_rpc_method_handler(call.unary)
        )
        if len(self._handlers) > 10_000:  # methods of services since dropped
            self._handlers.clear()
        self._handlers[method] = (entry, handler)
        return handler


class _Call:
    """One relayed call: admission (key, owner, route), then the upstream call."""

    def __init__(self, front: GrpcFront, entry: ServedService, method: str) -> None:
        self._front = front
        self._entry = entry
        self._method = method

    async def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], *, stream: bool
    ) -> tuple[Route, Ticket]:
        headers = metadata_headers(context.invocation_metadata())
        state = self._front.state
        principal = await state.auth.authenticate(headers, "user")
        if not grpc_services.may_call(self._entry, principal):
            raise NotFound(f"no API serves {self._method.split('/')[1]}")
        # Over a limit: RESOURCE_EXHAUSTED with retry-after metadata (status_for).
        ticket = await state.limiter.admit(principal, stream=stream)
        with ticket:
            route = state.supervisor.route(self._entry.model)
            if route is not None:  # warm: the hot path stops here
                return route, ticket
            # `prefer: wait=N` metadata shortens the wait, as the header does over HTTP.
            prefer = headers.get("prefer")
            wait_s = cold_wait_s(prefer, COLD_WAIT_S) if prefer else COLD_WAIT_S
            remaining = context.time_remaining()
            if remaining is not None:
                wait_s = max(0.0, min(remaining, wait_s))
            return await self._front.route(self._entry, principal, wait_s), ticket

    async def _fail(
        self, context: grpc.aio.ServicerContext[Any, Any], route: Route | None, exc: Exception
    ) -> None:
        if isinstance(exc, MlcpError):
            headers = exc.headers()
            await _abort(context, status_for(exc), exc.message, headers.get("Retry-After"))
        assert isinstance(exc, grpc.aio.AioRpcError)
        code = exc.code()
        state = self._front.state
        if route is not None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            state.activity.reject(route.instance_id)
        if route is not None and code == grpc.StatusCode.UNAVAILABLE:
            self._front.forget(route)
            await _abort(
                context, code, "the API's instance is unavailable (it stopped or died)", "1"
            )
        await _abort(context, code, exc.details() or code.name, _retry_after(exc))

    async def unary(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        route: Route | None = None
        try:
            route, ticket = await self._admit(context, stream=False)
            with ticket:
                upstream = await self._front.channel(route)
        except MlcpError as exc:
            await self._fail(context, route, exc)
            raise
        activity = self._front.state.activity
        activity.begin(route.instance_id)
        completed = False
        call = upstream.unary(self._method)(raw, timeout=context.time_remaining())
        try:
            reply: bytes = await call
            completed = True
            return reply
        except grpc.aio.AioRpcError as exc:
            await self._fail(context, route, exc)
            raise
        finally:
            if not completed:
                call.cancel()  # a client cancel or deadline: the instance stops too
            activity.end(route.instance_id, completed=completed)

    async def stream(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        route: Route | None = None
        try:
            route, ticket = await self._admit(context, stream=True)
            with ticket:
                upstream = await self._front.channel(route)
        except MlcpError as exc:
            await self._fail(context, route, exc)
            raise
        activity = self._front.state.activity
        activity.begin(route.instance_id)
        completed = False
        call = upstream.stream(self._method)(raw, timeout=context.time_remaining())
        try:
            async for chunk in call:
                yield chunk
            completed = True
        except grpc.aio.AioRpcError as exc:
            await self._fail(context, route, exc)
            raise
        finally:
            if not completed:
                call.cancel()
            activity.end(route.instance_id, completed=completed)
            ticket.end_stream()
