"""Command line: `serve` one model over HTTP, `convert` a GGUF file into a safetensors dir,
run the `zygote` that forks agents with torch already imported (`instance_agent.zygote`), or
wait as a `spare` in a warm container until claimed as an instance (`instance_agent.spare`).

Exit codes: 0 after a clean stop, 2 for bad arguments, 3 when the model cannot be loaded (or
converted); stderr then holds one line `mlcp-agent: load failed: <reason>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

import uvicorn

from instance_agent.app import AgentConfig, agent_state, create_app
from instance_agent.engines import ENGINES
from instance_agent.protocol import DEFAULT_MAX_NEW_TOKENS_CAP, TASKS

logger = logging.getLogger("uvicorn.error")

EXIT_LOAD_FAILED = 3
# Streams still open this long after SIGTERM are cancelled; generation itself is aborted at
# once, so in practice every response has ended well before.
_GRACEFUL_SHUTDOWN_S = 2
_SHUTDOWN_POLL_S = 0.005


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be between 0 and 10, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instance_agent", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="load one model and serve it over HTTP")
    serve.add_argument("--model-dir", type=Path, required=True, help="model directory")
    serve.add_argument("--gguf-file", help="a .gguf file inside --model-dir to load instead")
    serve.add_argument(
        "--model-name", help="the name /health reports (default: the model directory's name)"
    )
    serve.add_argument(
        "--task",
        choices=TASKS,
        help="what to serve (default: read from the model's config.json)",
    )
    serve.add_argument(
        "--engine",
        choices=ENGINES,
        help="what generates text (default: llama.cpp for --gguf-file where installed, "
        "else transformers)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--concurrency", type=_positive, default=1, help="requests per batch")
    serve.add_argument("--max-queue", type=_non_negative, default=0, help="requests that wait")
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    serve.add_argument("--max-new-tokens-cap", type=_positive, default=DEFAULT_MAX_NEW_TOKENS_CAP)
    serve.add_argument(
        "--handler-timeout-s",
        type=float,
        default=60.0,
        help="a handler project's call answers 504 after this many seconds",
    )
    serve.add_argument(
        "--grpc-port",
        type=_non_negative,
        default=0,
        help="a handler project with a .proto: its gRPC port (0: any free one, see /health)",
    )
    serve.add_argument(
        "--grpc-max-message-bytes",
        type=_positive,
        default=16 * 1024 * 1024,
        help="the largest gRPC request or reply (MLCP_GRPC_MAX_MESSAGE_BYTES)",
    )
    serve.add_argument(
        "--step-delay-s",
        type=_seconds,
        default=0.0,
        help="testing aid: sleep this long at every decoding step",
    )

    convert = commands.add_parser("convert", help="dequantize a GGUF file into a model dir")
    convert.add_argument("--gguf-file", type=Path, required=True)
    convert.add_argument("--out", type=Path, required=True)

    zygote = commands.add_parser("zygote", help="fork `serve` children with torch imported")
    zygote.add_argument("--socket", type=Path, required=True, help="Unix socket to listen on")

    spare = commands.add_parser("spare", help="import torch, then wait to be claimed (docker)")
    spare.add_argument("--host", default="127.0.0.1")
    spare.add_argument("--port", type=int, required=True)
    return parser


def _fatal(what: str, reason: str) -> None:
    print(f"mlcp-agent: {what}: {' '.join(reason.split())}", file=sys.stderr, flush=True)


class _AgentServer(uvicorn.Server):
    """A uvicorn server that aborts generation and begins its shutdown the moment a stop signal
    arrives.

    uvicorn looks at `should_exit` every 0.1 s; an evicted instance's memory is free only once
    its process is gone, and the load that evicted it waits for that, so the wait is cut short.
    """

    def __init__(self, config: uvicorn.Config, on_exit_signal: threading.Event) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit_signal.set()
        super().handle_exit(sig, frame)
        if self._loop is not None and self._wake is not None:
            # A signal handler runs between two bytecodes of the loop's own thread: hand over.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def main_loop(self) -> None:
        """uvicorn's loop of ticks, woken at once by a stop signal instead of at the next one."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown (stop accepting, let responses end within the graceful timeout,
        then the lifespan's shutdown) without its fixed 0.1 s pauses: an idle agent is gone
        ~10 ms after SIGTERM instead of ~105 ms (SIGTERM to exit of a forked SmolLM2 agent)."""
        logger.info("Shutting down")
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        state = self.server_state
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                # uvicorn offers no event for "no connection or task left": poll it.
                while (state.connections or state.tasks) and not self.force_exit:  # noqa: ASYNC110
                    await asyncio.sleep(_SHUTDOWN_POLL_S)
                for server in self.servers:
                    await server.wait_closed()
        except TimeoutError:
            logger.error("cancelling %d running task(s) at the graceful timeout", len(state.tasks))
            for task in state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()


def _default_name(model_dir: Path, gguf_file: str | None) -> str:
    return Path(gguf_file).stem if gguf_file else model_dir.resolve().name


def serve(args: argparse.Namespace) -> int:
    """Serve one model until stopped; return the exit code."""
    config = AgentConfig(
        model_dir=args.model_dir,
        model_name=args.model_name or _default_name(args.model_dir, args.gguf_file),
        gguf_file=args.gguf_file,
        task=args.task,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        device=args.device,
        max_new_tokens_cap=args.max_new_tokens_cap,
        step_delay_s=args.step_delay_s,
        handler_timeout_s=args.handler_timeout_s,
        grpc_port=args.grpc_port,
        grpc_max_message_bytes=args.grpc_max_message_bytes,
        engine=args.engine,
    )
    load_failed = threading.Event()
    exit_signal = threading.Event()
    server: _AgentServer | None = None

    def on_load_failed(reason: str) -> None:
        _fatal("load failed", reason)
        load_failed.set()
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_load_failed=on_load_failed, grpc_host=args.host)
    state = agent_state(app)
    server = _AgentServer(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            access_log=False,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        ),
        exit_signal,
    )

    def abort_on_exit_signal() -> None:
        exit_signal.wait()
        state.begin_shutdown()

    # Aborting generation at SIGTERM frees the open streams at once instead of after the graceful
    # timeout. It runs on its own thread because the signal handler interrupts the event loop's
    # thread, which may hold the batcher's lock at that moment.
    threading.Thread(target=abort_on_exit_signal, name="mlcp-exit-watch", daemon=True).start()
    server.run()
    if load_failed.is_set():
        return EXIT_LOAD_FAILED
    return 0


def convert(args: argparse.Namespace) -> int:
    """Convert a GGUF file into a safetensors model directory; print the directory."""
    from instance_agent import model
    from instance_agent.protocol import LoadFailed

    try:
        out_dir = model.convert_gguf(args.gguf_file.resolve(), args.out.resolve())
    except LoadFailed as exc:
        _fatal("convert failed", exc.message)
        return EXIT_LOAD_FAILED
    print(out_dir, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "convert":
        return convert(args)
    if args.command == "zygote":
        from instance_agent import zygote

        return zygote.serve(args.socket)
    if args.command == "spare":
        from instance_agent import spare

        return spare.serve(args.host, args.port)
    return serve(args)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The loader thread may still be inside torch; don't let interpreter teardown wait on it.
    os._exit(code)
