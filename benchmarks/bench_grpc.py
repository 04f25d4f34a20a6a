"""gRPC overhead: unary calls through the control plane's gRPC port vs straight to the agent.

One handler project with a .proto (tests/handler_projects.py `grpc_echo`: a trivial method, no
model) is a catalog API of a real control plane (a subprocess, as `make run` serves) with a real
agent. Prints, side by side against the same instance:

- the latency the control plane adds at p50 (goal <= 0.5 ms) and p99, unary, one client;
- throughput through the control plane ÷ direct with 8 concurrent clients;
- gRPC ÷ HTTP at p50 for the same trivial handler, both straight to the agent (`Predict` over
  gRPC against `POST /handle`), which is what the protocol itself costs. `POST /{api}` on the
  control plane, the HTTP twin of the relayed call, comes with the handler routes (issue 11).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import grpc
import grpc.aio

from benchmarks.harness import ControlPlane, control_plane, free_port, percentile
from instance_agent.client import AgentClient
from tests.grpc_stubs import generate
from tests.handler_projects import grpc_echo

MODEL = "bench/grpc-echo"
ROUNDS = 1500
WARMUP = 100
THROUGHPUT_PAIRS = 6
THROUGHPUT_S = 1.5
CLIENTS = 8


async def _latency(calls: dict[str, Any]) -> dict[str, list[float]]:
    """Milliseconds per call for each named coroutine factory, alternated call by call."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(ROUNDS + WARMUP):
        for name, call in calls.items():
            t0 = time.perf_counter()
            await call()
            if i >= WARMUP:
                out[name].append((time.perf_counter() - t0) * 1000)
    return out


async def _throughput(call: Any) -> int:
    done = 0
    deadline = time.perf_counter() + THROUGHPUT_S

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return done


async def _run(cp: ControlPlane, grpc_port: int, pb2: ModuleType, pb2_grpc: ModuleType) -> None:
    metadata = (("authorization", f"Key {cp.key}"),)
    request = pb2.Text(text="hello")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as front:
        via_cp = pb2_grpc.EchoStub(front)
        await via_cp.Predict(request, metadata=metadata, timeout=120)  # loads the API
        status = cp.call("/model/status", {"model": MODEL})
        assert isinstance(status, dict)
        endpoint = str(status["endpoint"])
        async with aiohttp.ClientSession() as http:
            agent_grpc = (await AgentClient(http).health(endpoint))["grpcPort"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{agent_grpc}") as agent:
                direct = pb2_grpc.EchoStub(agent)

                async def through() -> None:
                    await via_cp.Predict(request, metadata=metadata, timeout=10)

                async def straight() -> None:
                    await direct.Predict(request, timeout=10)

                async def over_http() -> None:
                    async with http.post(endpoint + "/handle", json={"text": "hello"}) as r:
                        await r.read()
                        assert r.status == 200

                times = await _latency({"direct": straight, "proxied": through, "http": over_http})
                d50, d99 = percentile(times["direct"], 0.5), percentile(times["direct"], 0.99)
                p50, p99 = percentile(times["proxied"], 0.5), percentile(times["proxied"], 0.99)
                h50 = percentile(times["http"], 0.5)
                print(
                    f"gRPC unary via the control plane: added p50 {p50 - d50:.2f} ms "
                    f"(goal <= 0.5), added p99 {p99 - d99:.2f} ms [direct p50 {d50:.2f} / p99 "
                    f"{d99:.2f} ms; proxied p50 {p50:.2f} / p99 {p99:.2f} ms; "
                    f"ratio p50 {p50 / d50:.2f}x]"
                )
                ratios = []
                for pair in range(THROUGHPUT_PAIRS):
                    order = [straight, through] if pair % 2 == 0 else [through, straight]
                    counts = {fn: await _throughput(fn) for fn in order}
                    ratios.append(counts[through] / max(1, counts[straight]))
                    last = counts
                ratios.sort()
                print(
                    f"gRPC throughput at {CLIENTS} concurrent: proxied ÷ direct "
                    f"{ratios[len(ratios) // 2]:.2f}x (median of {THROUGHPUT_PAIRS} pairs; last "
                    f"pair {last[through] / THROUGHPUT_S:.0f} vs "
                    f"{last[straight] / THROUGHPUT_S:.0f} calls/s)"
                )
                print(
                    f"gRPC ÷ HTTP, same handler straight to the agent: p50 {d50:.2f} ÷ "
                    f"{h50:.2f} ms = {d50 / h50:.2f}x"
                )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-grpc-") as tmp:
        root = Path(tmp) / "models"
        project = grpc_echo(root / "bench" / "grpc-echo", concurrency=CLIENTS)
        pb2, pb2_grpc = generate(project, "echo.proto", Path(tmp) / "stubs")
        grpc_port = free_port()
        with control_plane(
            [root], MLCP_GRPC_PORT=str(grpc_port), MLCP_INCLUDE_PACKAGED_MODELS="false"
        ) as cp:
            cp.mark_measured([MODEL], 50_000_000)
            asyncio.run(_run(cp, grpc_port, pb2, pb2_grpc))


if __name__ == "__main__":
    main()
