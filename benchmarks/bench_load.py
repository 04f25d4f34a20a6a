"""Sustained load through the control plane beside the same load sent straight to the agent.

Two figures (issue 17): unary requests per second with p99 latency from CLIENTS concurrent
clients against a fast fake agent (goal >= 400 req/s at p99 < 250 ms), and STREAMS concurrent
streams held for STREAM_S seconds with none dropped (every stream receives every chunk).
BENCH_LOAD_UNARY_S and BENCH_LOAD_STREAM_S shorten the rounds for a quick look.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.harness import FAKE_AGENT, ControlPlane, control_plane, percentile
from tests.fake_agent import write_fake_model

CLIENTS = 32
UNARY_S = float(os.environ.get("BENCH_LOAD_UNARY_S", "10"))
STREAMS = 256
STREAM_S = float(os.environ.get("BENCH_LOAD_STREAM_S", "60"))
# An instance serves at most 64 at once (the load API's cap): four stream instances hold 256.
STREAM_INSTANCES = 4
PER_INSTANCE = STREAMS // STREAM_INSTANCES
CHUNK_EVERY_S = 0.5
CHUNKS = int(STREAM_S / CHUNK_EVERY_S)


async def _unary(url: str, body: dict[str, object], headers: dict[str, str]) -> tuple[int, float]:
    """(requests done, p99 ms) by CLIENTS workers in UNARY_S seconds; any non-200 fails."""
    latencies: list[float] = []
    deadline = time.perf_counter() + UNARY_S
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with s.post(url, json=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                latencies.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return len(latencies), percentile(latencies, 0.99)


async def _streams(targets: list[tuple[str, dict[str, object]]], headers: dict[str, str]) -> int:
    """Hold one stream per target at once; the number that ended complete (every chunk)."""
    expected = "".join(f"tok{i} " for i in range(CHUNKS))
    timeout = aiohttp.ClientTimeout(total=STREAM_S * 3)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:

        async def one(url: str, body: dict[str, object]) -> bool:
            try:
                async with s.post(url, json=body, headers=headers) as r:
                    raw = (await r.read()).decode()
            except (aiohttp.ClientError, TimeoutError):
                return False
            if url.endswith("/stream"):  # the agent's own NDJSON events
                raw = "".join(
                    str(json.loads(line).get("text", "")) for line in raw.splitlines() if line
                )
            return r.status == 200 and raw == expected

        done = await asyncio.gather(*(one(url, body) for url, body in targets))
    return sum(done)


def _run(cp: ControlPlane) -> None:
    headers = {"Authorization": f"Key {cp.key}"}
    streamed = [f"bench/held-{i}" for i in range(STREAM_INSTANCES)]
    cp.mark_measured(["bench/fast", *streamed], 50_000_000)
    cp.call("/model/load", {"model": "bench/fast", "concurrency": 64})
    for model in streamed:
        cp.call("/model/load", {"model": model, "concurrency": PER_INSTANCE})
    fast = str(cp.wait_running("bench/fast")["endpoint"])
    held = {m: str(cp.wait_running(m)["endpoint"]) for m in streamed}

    direct_n, direct_p99 = asyncio.run(_unary(fast + "/run", {"prompt": "x"}, headers))
    body = {"model": "bench/fast", "prompt": "x"}
    proxied_n, proxied_p99 = asyncio.run(_unary(cp.base + "/model/run", body, headers))
    print(
        f"sustained unary ({CLIENTS} clients, {UNARY_S:.0f} s): proxied "
        f"{proxied_n / UNARY_S:.0f} req/s at p99 {proxied_p99:.1f} ms (goal >= 400 req/s, "
        f"p99 < 250 ms) [direct {direct_n / UNARY_S:.0f} req/s at p99 {direct_p99:.1f} ms; "
        f"ratio {proxied_n / max(direct_n, 1):.2f}]"
    )

    direct_targets = [
        (held[m] + "/stream", {"prompt": "x"}) for m in streamed for _ in range(PER_INSTANCE)
    ]
    proxied_targets = [
        (cp.base + "/model/run", {"model": m, "prompt": "x", "stream": True})
        for m in streamed
        for _ in range(PER_INSTANCE)
    ]
    started = time.perf_counter()
    direct_ok = asyncio.run(_streams(direct_targets, headers))
    direct_s = time.perf_counter() - started
    started = time.perf_counter()
    proxied_ok = asyncio.run(_streams(proxied_targets, headers))
    proxied_s = time.perf_counter() - started
    print(
        f"held streams ({STREAMS} at once, {CHUNKS} chunks over {STREAM_S:.0f} s): proxied "
        f"{proxied_ok}/{STREAMS} complete in {proxied_s:.1f} s (goal: none dropped) "
        f"[direct {direct_ok}/{STREAMS} in {direct_s:.1f} s]"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        write_fake_model(models, "bench/fast", "ok", delay_s=0.0)
        for i in range(STREAM_INSTANCES):
            write_fake_model(models, f"bench/held-{i}", "ok", delay_s=CHUNK_EVERY_S, tokens=CHUNKS)
        with control_plane(
            [models],
            fake_agent=FAKE_AGENT,
            MLCP_MAX_QUEUE="256",
            MLCP_INCLUDE_PACKAGED_MODELS="false",
        ) as cp:
            names = ["bench/fast", *(f"bench/held-{i}" for i in range(STREAM_INSTANCES))]
            try:
                _run(cp)
            finally:
                for model in names:
                    with contextlib.suppress(OSError):
                        cp.call("/model/delete", {"model": model})


if __name__ == "__main__":
    main()
