"""The handler engine: a project's own Python code, imported and called in the instance only.

A handler project is a directory with a spec (`instance_agent.project`), the handler module it
names, and `model/` holding the weights (exported as `MODEL_DIR`). The module is imported once,
then either Cortex's `Handler(config)` is built (calls go to `handle_post(payload)`) or the one
`@handler` / `@hub_handler` function is used (calls go to `function(payload, None)`).

With `handler.protobuf_path` (Cortex's gRPC form) the proto is compiled first
(`instance_agent.proto`), and `Handler(config, proto_module_pb2)` gets the generated module; each
RPC calls the method of its name (`instance_agent.grpc_server`), and `handle_post` is optional.

Calls run on worker threads, at most `concurrency` at once, with up to `max_queue` waiting. A
call that raises answers 502 `handler_error` (type and message; the traceback goes to the log);
one that outlives the timeout answers 504 `handler_timeout` while its thread keeps its place
until the code returns, since Python cannot stop a thread.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import json
import logging
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from instance_agent import handler as handler_module
from instance_agent.batcher import Load
from instance_agent.project import SPEC_FILE, InvalidSpec, ProjectSpec, parse_spec
from instance_agent.proto import CompiledProto, ProtoInvalid, compile_proto, import_generated
from instance_agent.protocol import AgentError, InstanceBusy, LoadFailed

logger = logging.getLogger(__name__)

DEFAULT_HANDLER_TIMEOUT_S = 60.0
_MODULE_NAME = "mlcp_user_handler"
_POOL_THREADS = 64
_T = TypeVar("_T")


class HandlerFailed(AgentError):
    """The handler raised an exception."""

    status_code = 502
    code = "handler_error"


class HandlerBadOutput(AgentError):
    """The handler returned a value that is not JSON-serialisable."""

    status_code = 502
    code = "handler_bad_output"


class HandlerGrpcOnly(AgentError):
    """This handler project is served over gRPC only: its Handler has no handle_post."""

    status_code = 404
    code = "grpc_only"


class HandlerTimeout(AgentError):
    """The handler did not return in time."""

    status_code = 504
    code = "handler_timeout"


def read_project_spec(project_dir: Path) -> ProjectSpec:
    """Read `mlcp.yaml` of a project, or its only other `.yaml` file (Cortex's layout)."""
    candidates = [project_dir / SPEC_FILE]
    if not candidates[0].is_file():
        candidates = sorted(project_dir.glob("*.yaml")) + sorted(project_dir.glob("*.yml"))
    if len(candidates) != 1 or not candidates[0].is_file():
        raise LoadFailed(f"{project_dir} has no {SPEC_FILE} (nor exactly one other .yaml spec)")
    try:
        return parse_spec(candidates[0].read_text("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadFailed(f"the spec cannot be read: {exc}") from exc
    except InvalidSpec as exc:
        raise LoadFailed(f"{candidates[0].name}: {exc.message}") from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000]


def _import_module(path: Path, project_dir: Path) -> Any:
    # `from hub import hub_handler` (CellStrat) and `import mlcp_handler` both mean this shim.
    sys.modules["hub"] = handler_module
    sys.modules["mlcp_handler"] = handler_module
    for folder in (str(path.parent), str(project_dir)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise LoadFailed(f"{path.name} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class LoadedHandler:
    """A project's imported handler: its spec, its JSON call and, with a proto, its gRPC side."""

    spec: ProjectSpec
    # `payload -> output` for POST /handle; None for a gRPC-only Cortex Handler.
    call: Callable[[Any], Any] | None
    grpc: GrpcHandler | None = None


@dataclass(frozen=True)
class GrpcHandler:
    """The compiled proto, its generated module and the Handler instance its RPCs call."""

    compiled: CompiledProto
    module: ModuleType
    instance: Any


def _check_rpc_methods(cls: type, compiled: CompiledProto) -> None:
    for service in compiled.services:
        for method in service.methods:
            function = getattr(cls, method.name, None)
            if not callable(function):
                raise LoadFailed(
                    f"class Handler has no method {method.name}(self, payload) for the RPC "
                    f"{service.full_name}/{method.name}"
                )
            if not method.server_streaming and inspect.isgeneratorfunction(function):
                raise LoadFailed(
                    f"Handler.{method.name} is a generator but {service.full_name}/"
                    f"{method.name} is a unary RPC: return one message, or declare "
                    "`returns (stream ...)`"
                )


def _compile(spec: ProjectSpec, root: Path, proto_out: Path | None) -> tuple[CompiledProto, Any]:
    assert spec.protobuf_path is not None
    out = proto_out or Path(tempfile.mkdtemp(prefix="mlcp-proto-"))
    try:
        compiled = compile_proto(root, spec.protobuf_path, out)
        return compiled, import_generated(compiled)
    except ProtoInvalid as exc:
        raise LoadFailed(f"{spec.protobuf_path}: {exc.message}") from exc


def load_handler(project_dir: Path, *, proto_out: Path | None = None) -> LoadedHandler:
    """Import a project's handler once; with a proto, compile it first (into `proto_out`)."""
    spec = read_project_spec(project_dir)
    root = project_dir.resolve()
    path = (root / spec.handler_path).resolve()
    if not path.is_relative_to(root):
        raise LoadFailed("handler.path leaves the project")
    if not path.is_file():
        raise LoadFailed(f"handler file {spec.handler_path} is not in the project")
    compiled: CompiledProto | None = None
    generated: ModuleType | None = None
    if spec.protobuf_path is not None:
        # Before the user's code runs: a bad proto is reported as protoc words it.
        compiled, generated = _compile(spec, root, proto_out)
    os.environ["MODEL_DIR"] = str(root / "model")
    before = len(handler_module.registered())
    try:
        module = _import_module(path, root)
    except LoadFailed:
        raise
    except BaseException as exc:
        logger.exception("importing %s failed", spec.handler_path)
        raise LoadFailed(f"importing {spec.handler_path} failed: {_describe(exc)}") from exc
    cls = getattr(module, "Handler", None)
    if compiled is not None and generated is not None:
        if not isinstance(cls, type):
            raise LoadFailed(
                "a project with handler.protobuf_path must define class Handler with "
                "__init__(self, config, proto_module_pb2) and one method per RPC"
            )
        _check_rpc_methods(cls, compiled)
        try:
            instance = cls(dict(spec.handler_config), generated)
        except BaseException as exc:
            logger.exception("Handler(config, proto_module_pb2) failed")
            raise LoadFailed(f"Handler(config, proto_module_pb2) failed: {_describe(exc)}") from exc
        post = getattr(instance, "handle_post", None)
        return LoadedHandler(
            spec,
            post if callable(post) else None,
            GrpcHandler(compiled=compiled, module=generated, instance=instance),
        )
    if isinstance(cls, type):
        if not callable(getattr(cls, "handle_post", None)):
            raise LoadFailed("class Handler has no handle_post(self, payload) method")
        try:
            instance = cls(dict(spec.handler_config))
        except BaseException as exc:
            logger.exception("Handler(config) failed")
            raise LoadFailed(f"Handler(config) failed: {_describe(exc)}") from exc
        call: Callable[[Any], Any] = instance.handle_post
        return LoadedHandler(spec, call)
    functions = handler_module.registered()[before:]
    if len(functions) != 1:
        raise LoadFailed(
            f"{spec.handler_path} must define class Handler or exactly one @handler "
            f"(@hub_handler) function; found {len(functions)} decorated functions"
        )
    function = functions[0]
    return LoadedHandler(spec, lambda payload: function(payload, None))


class HandlerPool:
    """Runs handler calls on worker threads, `concurrency` at once, with a bounded queue."""

    def __init__(
        self,
        call: Callable[[Any], Any] | None,
        *,
        concurrency: int,
        max_queue: int,
        timeout_s: float = DEFAULT_HANDLER_TIMEOUT_S,
    ) -> None:
        self._call = call
        self._concurrency = concurrency
        self._max_queue = max_queue
        self._timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="mlcp-handler")
        self._running = 0
        self._requests = 0
        self._max_seen = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def concurrency(self) -> int:
        return self._concurrency

    def start(self) -> None:
        """Nothing to start: worker threads are made on the first calls."""

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop taking calls; a running handler is left to finish on its daemon-like thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def reconfigure(self, concurrency: int) -> None:
        """Serve up to `concurrency` calls at once from now on."""
        self._concurrency = concurrency

    def load(self) -> Load:
        """The pool's figures in the batcher's shape (a call is a batch of one)."""
        return Load(
            in_flight=self._running,
            queued=len(self._waiters),
            batches=self._requests,
            max_batch_size=1 if self._requests else 0,
            requests=self._requests,
        )

    def _run(self, payload: Any) -> bytes:
        if self._call is None:
            raise HandlerGrpcOnly()
        started = time.monotonic()
        output = self._call(payload)
        try:
            body = {"output": output, "time_seconds": round(time.monotonic() - started, 6)}
            return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise HandlerBadOutput(
                f"the handler returned {type(output).__name__}, which is not JSON: {exc}"
            ) from None

    async def call(self, payload: Any) -> bytes:
        """Run one call; return its JSON body `{"output", "time_seconds"}`."""
        if self._call is None:
            raise HandlerGrpcOnly()
        return await self.run(functools.partial(self._run, payload))

    async def _take_place(self) -> None:
        loop = asyncio.get_running_loop()
        if self._running >= self._concurrency:
            if len(self._waiters) >= self._max_queue:
                raise InstanceBusy()
            turn: asyncio.Future[None] = loop.create_future()
            self._waiters.append(turn)
            try:
                await turn  # a finishing call hands its place over
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self._release()
                else:
                    self._waiters.remove(turn)
                raise
        else:
            self._running += 1
        self._requests += 1

    def _timeout(self, timeout_s: float | None) -> float:
        return self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)

    async def run(self, work: Callable[[], _T], *, timeout_s: float | None = None) -> _T:
        """Run `work()` on a worker thread in its turn; its exceptions become `HandlerFailed`.

        The place is held until the thread returns, even when the caller stops waiting
        (timeout, cancel): the thread cannot be stopped, so the place is not free.
        """
        await self._take_place()
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, _guarded, work)
        except RuntimeError:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        limit = self._timeout(timeout_s)
        try:
            return await asyncio.wait_for(asyncio.shield(future), limit)
        except TimeoutError:
            raise HandlerTimeout(f"the handler did not return within {limit:g} s") from None

    async def stream(
        self, start: Callable[[], Iterable[_T]], *, timeout_s: float | None = None
    ) -> AsyncIterator[_T]:
        """Iterate `start()` on worker threads, one item per step, holding one place throughout.

        However the consumer stops (done, cancelled, timed out), the iterator is closed on a
        worker thread once its running step returns, and only then is the place freed.
        """
        await self._take_place()
        loop = asyncio.get_running_loop()
        holder: list[Iterator[_T]] = []

        def step() -> _T | _Done:
            if not holder:
                holder.append(iter(start()))
            return next(holder[0], _DONE)

        pending: asyncio.Future[_T | _Done] | None = None
        limit = self._timeout(timeout_s)
        try:
            while True:
                pending = loop.run_in_executor(self._executor, _guarded, step)
                try:
                    item = await asyncio.wait_for(asyncio.shield(pending), limit)
                except TimeoutError:
                    raise HandlerTimeout(
                        f"the handler gave no next message within {limit:g} s"
                    ) from None
                if isinstance(item, _Done):
                    return
                yield item
        finally:
            self._close_later(loop, pending, holder)

    def _close_later(
        self,
        loop: asyncio.AbstractEventLoop,
        pending: asyncio.Future[Any] | None,
        holder: list[Iterator[Any]],
    ) -> None:
        def close() -> None:
            try:
                closer = getattr(holder[0], "close", None) if holder else None
                if callable(closer):
                    closer()
            except BaseException:
                logger.exception("closing the handler's generator raised")
            finally:
                loop.call_soon_threadsafe(self._release)

        def submit(_: object = None) -> None:
            try:
                self._executor.submit(close)
            except RuntimeError:  # the pool is stopping
                self._release()

        if pending is not None and not pending.done():
            pending.add_done_callback(submit)
        else:
            submit()

    def _release(self) -> None:
        # Runs on the event loop: hand the place to the oldest waiter, or free it.
        while self._waiters and self._running <= self._concurrency:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._running -= 1


class _Done:
    """The end of a handler's stream."""


_DONE = _Done()


def _guarded(work: Callable[[], _T]) -> _T:
    try:
        return work()
    except AgentError:
        raise
    except BaseException as exc:
        # SystemExit too: a handler's sys.exit() is its error, not the instance's.
        logger.exception("the handler raised")
        raise HandlerFailed(_describe(exc)) from None
