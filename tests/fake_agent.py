"""A fake instance agent with behaviour, for the control plane's own tests and benchmarks.

Run as `python tests/fake_agent.py serve --model-dir DIR ...` (the real agent's CLI). Its
behaviour comes from DIR/fake.json: {"mode": ..., "delay_s": ..., "tokens": ..., "mem_bytes": ...}

modes: ok · slow (delay per token) · crash_on_run · crash_mid_stream · hang_mid_stream ·
garbage · never_healthy · load_fail · exit_after_ready
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from instance_agent.engines import EngineName, parse_engine
from instance_agent.lease import LEASE_ENV, LEASE_HEADER, Lease, parse_lease_s, watch
from instance_agent.protocol import (
    HEALTH_NOTE_LOADING,
    HEALTH_NOTE_READY,
    HealthLoading,
    HealthReady,
)


def write_fake_model(root: Path, name: str, mode: str = "ok", **behaviour: Any) -> Path:
    """Create `root/org/name` as a catalog entry whose instances behave as `mode`."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["FakeForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "fake.json").write_text(json.dumps({"mode": mode, **behaviour}))
    return folder


class Fake:
    def __init__(self, behaviour: dict[str, Any], concurrency: int, max_queue: int) -> None:
        self.mode: str = behaviour.get("mode", "ok")
        self.delay_s: float = float(behaviour.get("delay_s", 0.0))
        self.tokens: int = int(behaviour.get("tokens", 4))
        self.mem_bytes: int = int(behaviour.get("mem_bytes", 50_000_000))
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.engine: EngineName | None = None
        self.running = 0
        self.waiting = 0
        self.cond = asyncio.Condition()
        self.hung = False
        self.requests = 0

    async def admit(self) -> bool:
        async with self.cond:
            if self.running >= self.concurrency:
                if self.waiting >= self.max_queue:
                    return False
                self.waiting += 1
                try:
                    await self.cond.wait_for(lambda: self.running < self.concurrency)
                finally:
                    self.waiting -= 1
            self.running += 1
            self.requests += 1
            return True

    async def release(self) -> None:
        async with self.cond:
            self.running -= 1
            self.cond.notify_all()


def busy() -> Response:
    return JSONResponse(
        {"error": "instance busy", "code": "instance_busy"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(fake: Fake, name: str, exit_after_s: float | None = None) -> Starlette:
    lease: Lease | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal lease
        if exit_after_s is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(exit_after_s, os._exit, 7)
        # The real agent's lease (instance_agent/lease.py), so lease tests run on fakes.
        initial = parse_lease_s(os.environ.get(LEASE_ENV))
        watcher = None
        if initial is not None:
            lease = Lease(initial, time.monotonic())
            stop = functools.partial(os.kill, os.getpid(), signal.SIGTERM)
            watcher = asyncio.create_task(watch(lease, time.monotonic, stop))
        yield
        if watcher is not None:
            watcher.cancel()

    async def health(request: Request) -> Response:
        renew = parse_lease_s(request.headers.get(LEASE_HEADER))
        if lease is not None and renew is not None:
            lease.renew(renew, time.monotonic())
        if fake.mode == "never_healthy":
            waiting: HealthLoading = {
                "status": "loading",
                "model": name,
                "model_loaded": False,
                "note": HEALTH_NOTE_LOADING,
            }
            return JSONResponse(waiting, status_code=503)
        if fake.hung:
            await asyncio.sleep(3600)
        body: HealthReady = {
            "status": "healthy",
            "model": name,
            "model_loaded": True,
            "note": HEALTH_NOTE_READY,
            "task": "text-generation",
            "concurrency": fake.concurrency,
            "maxQueue": fake.max_queue,
            "inFlight": fake.running,
            "queued": fake.waiting,
            "loadSeconds": 0.0,
            "device": "cpu",
            "contextLength": 256,
            "memory": {
                "rssBytes": fake.mem_bytes,
                "peakRssBytes": fake.mem_bytes,
                "gpuBytes": None,
                "peakGpuBytes": None,
            },
            "stats": {"batches": fake.requests, "maxBatchSize": 1, "requests": fake.requests},
        }
        if fake.engine is not None:
            # The engine the control plane asked for (a real agent reports the one it runs).
            body["engine"] = fake.engine
        return JSONResponse(body)

    async def config(request: Request) -> Response:
        body = await request.json()
        fake.concurrency = int(body.get("concurrency", fake.concurrency))
        async with fake.cond:
            fake.cond.notify_all()
        return JSONResponse({"concurrency": fake.concurrency})

    async def run(request: Request) -> Response:
        body = await request.json()
        if fake.mode == "crash_on_run":
            os._exit(1)
        if not await fake.admit():
            return busy()
        try:
            started = time.perf_counter()
            delay = fake.delay_s * max(1, fake.tokens) if fake.mode == "slow" else fake.delay_s
            # Like the real agent, stop working for a caller that went away.
            sleeper = asyncio.ensure_future(asyncio.sleep(delay))
            gone = asyncio.ensure_future(disconnected(request))
            await asyncio.wait((sleeper, gone), return_when=asyncio.FIRST_COMPLETED)
            sleeper.cancel()
            gone.cancel()
            if not sleeper.done() or sleeper.cancelled():
                return Response(status_code=499)
            if fake.mode == "garbage":
                return Response("<<garbage>>", media_type="application/json")
            output = f"echo: {body.get('prompt')}"
            elapsed = time.perf_counter() - started
            return JSONResponse(
                {
                    "output": output,
                    "tokens_generated": fake.tokens,
                    "time_seconds": elapsed,
                    "tokens_per_second": fake.tokens / elapsed if elapsed else 0.0,
                }
            )
        finally:
            await fake.release()

    async def stream(request: Request) -> Response:
        await request.json()
        if not await fake.admit():
            return busy()

        async def lines() -> AsyncIterator[bytes]:
            started = time.perf_counter()
            try:
                for i in range(fake.tokens):
                    if fake.mode == "crash_mid_stream" and i == 2:
                        os._exit(1)
                    if fake.mode == "hang_mid_stream" and i == 2:
                        fake.hung = True
                        await asyncio.sleep(3600)
                    if fake.mode == "garbage" and i == 1:
                        yield b"not json at all\n"
                        return
                    await asyncio.sleep(fake.delay_s)
                    yield json.dumps({"text": f"tok{i} "}).encode() + b"\n"
                elapsed = time.perf_counter() - started
                done = {
                    "done": True,
                    "tokens_generated": fake.tokens,
                    "time_seconds": elapsed,
                    "tokens_per_second": fake.tokens / elapsed if elapsed else 0.0,
                }
                yield json.dumps(done).encode() + b"\n"
            finally:
                await fake.release()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/config", config, methods=["PUT"]),
            Route("/run", run, methods=["POST"]),
            Route("/stream", stream, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cmd", choices=["serve"])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gguf-file")
    parser.add_argument("--engine", choices=["transformers", "llama.cpp"])
    args = parser.parse_args()
    behaviour = json.loads((Path(args.model_dir) / "fake.json").read_text())
    if behaviour.get("mode") == "load_fail":
        print("mlcp-agent: load failed: the fake model refuses to load", file=sys.stderr)
        return 3
    # "start_delay_s": a model that takes a while to load (the port opens only after it).
    time.sleep(float(behaviour.get("start_delay_s", 0.0)))
    fake = Fake(behaviour, args.concurrency, args.max_queue)
    fake.engine = parse_engine(args.engine)
    exit_after = (
        float(behaviour.get("exit_after_s", 1.0))
        if behaviour.get("mode") == "exit_after_ready"
        else None
    )
    app = create_app(fake, args.model_name, exit_after)
    # A line for /model/logs to show.
    print(f"fake agent: serving {args.model_name} on {args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
