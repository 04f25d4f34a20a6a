"""The agent's gRPC server for a handler project with a `.proto` (Cortex's gRPC form).

It listens from the agent's start (on `--grpc-port`, or any free loopback port; `/health`
reports it as `grpcPort`) and answers UNAVAILABLE until the handler is loaded. Then each RPC of
the proto's services calls the Handler method of the same name on the handler pool's worker
threads (the same `concurrency` and queue as `POST /handle`): a unary RPC with the decoded
request, returning one message; a server-streaming RPC iterates what the method yields.

Requests arrive as raw bytes and are decoded here, so bytes that are not the request message
answer INVALID_ARGUMENT rather than grpcio's generic INTERNAL. What goes wrong maps to a status:

    handler raised                      INTERNAL, "ValueError: ..." (traceback in the log)
    returned something not the reply    INTERNAL, "Handler.Predict returned dict, not pkg.Msg"
    outlived --handler-timeout-s        DEADLINE_EXCEEDED (the client's own deadline too)
    queue full                          RESOURCE_EXHAUSTED, trailing metadata retry-after
    still loading / stopping            UNAVAILABLE
    method not in the proto             UNIMPLEMENTED (grpcio's own answer)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from instance_agent.proto import Method
from instance_agent.protocol import AgentError, InstanceBusy, ModelLoading
from instance_agent.state import AgentState
from instance_agent.user_code import HandlerPool, HandlerTimeout

logger = logging.getLogger(__name__)

_GRACE_S = 1.0


def _status_of(error: AgentError) -> grpc.StatusCode:
    if isinstance(error, InstanceBusy):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, HandlerTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, ModelLoading):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: AgentError) -> None:
    if error.retry_after_s:
        context.set_trailing_metadata((("retry-after", str(error.retry_after_s)),))
    await context.abort(_status_of(error), error.message)


class _Rpc:
    """One RPC of the proto, bound to the handler method of its name."""

    def __init__(self, state: AgentState, method: Method, module: Any, instance: Any) -> None:
        self._state = state
        self._method = method
        self._function: Callable[[Any], Any] = getattr(instance, method.name)
        self._input = _message_class(module, method.input_type)
        self._output = _message_class(module, method.output_type)

    def _pool(self) -> HandlerPool:
        return self._state.ready_handler()

    def _decode(self, raw: bytes) -> Message:
        try:
            return self._input.FromString(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:
            raise _BadRequest(
                f"the request is not a valid {self._method.input_type} message: {exc}"
            ) from None

    def _encode(self, reply: object) -> bytes:
        if not isinstance(reply, self._output):
            raise _BadReply(
                f"Handler.{self._method.name} returned {type(reply).__name__}, "
                f"not {self._method.output_type}"
            )
        return reply.SerializeToString()

    async def unary(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            pool = self._pool()
            request = self._decode(raw)
            return await pool.run(
                lambda: self._encode(self._function(request)),
                timeout_s=context.time_remaining(),
            )
        except _BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except AgentError as exc:
            await _abort(context, exc)
        raise AssertionError("abort returns only by raising")

    async def stream(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            pool = self._pool()
            request = self._decode(raw)

            def start() -> Iterable[bytes]:
                replies = self._function(request)
                if isinstance(replies, Message) or not isinstance(replies, Iterable):
                    raise _BadReply(
                        f"Handler.{self._method.name} returned {type(replies).__name__}; a "
                        "server-streaming RPC's method yields its messages"
                    )
                return (self._encode(reply) for reply in replies)

            async for chunk in pool.stream(start, timeout_s=context.time_remaining()):
                yield chunk
        except _BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except AgentError as exc:
            await _abort(context, exc)


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _BadReply(AgentError):
    """The handler returned something that is not the RPC's reply message."""

    code = "handler_bad_output"


def _message_class(module: Any, full_name: str) -> type[Message]:
    # The generated module registered its messages (and those of the files it imports) in the
    # default pool when it was imported.
    descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    return message_factory.GetMessageClass(descriptor)


class _Loading(grpc.GenericRpcHandler):
    """Answers every call: UNAVAILABLE while loading, the proto's RPCs once ready."""

    def __init__(self, state: AgentState) -> None:
        self._state = state
        self._rpcs: dict[str, grpc.RpcMethodHandler[Any, Any]] | None = None

    def _table(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]] | None:
        if self._rpcs is None and self._state.status == "ready":
            loaded = self._state.grpc_handler
            if loaded is None:
                return None
            table: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
            for service in loaded.compiled.services:
                for method in service.methods:
                    rpc = _Rpc(self._state, method, loaded.module, loaded.instance)
                    table[method.path] = (
                        grpc.unary_stream_rpc_method_handler(rpc.stream)
                        if method.server_streaming
                        else grpc.unary_unary_rpc_method_handler(rpc.unary)
                    )
            self._rpcs = table
        return self._rpcs

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        table = self._table()
        if table is None:
            return grpc.unary_unary_rpc_method_handler(self._unavailable)
        return table.get(handler_call_details.method)

    async def _unavailable(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        failed = self._state.status == "failed"
        await _abort(
            context, AgentError("the handler failed to load") if failed else ModelLoading()
        )


class AgentGrpcServer:
    """The gRPC server beside the agent's HTTP server, on the same event loop."""

    def __init__(self, state: AgentState, host: str) -> None:
        self._state = state
        limit = state.config.grpc_max_message_bytes
        self._server = grpc.aio.server(
            options=(
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # grpcio sets SO_REUSEPORT by default: a second server on the same port would
                # bind too and take half the calls. A taken port must fail, as for HTTP.
                ("grpc.so_reuseport", 0),
            )
        )
        self._server.add_generic_rpc_handlers((_Loading(state),))
        self.port = self._server.add_insecure_port(f"{host}:{state.config.grpc_port}")

    async def start(self) -> None:
        """Listen; the port is bound already."""
        await self._server.start()
        self._state.grpc_port = self.port
        logger.info("gRPC on port %d", self.port)

    async def stop(self, grace_s: float = _GRACE_S) -> None:
        """Stop taking calls and end the open ones after `grace_s`."""
        await self._server.stop(grace_s)
