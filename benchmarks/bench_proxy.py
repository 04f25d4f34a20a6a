"""Proxy overhead: /model/run through the control plane vs the same fake agent called directly.

Prints added latency (p50, p99) for a fast instance, throughput proxied ÷ direct at 8 concurrent
clients against a 20 ms instance, and streaming throughput proxied ÷ direct.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.harness import FAKE_AGENT, ControlPlane, control_plane, percentile
from tests.fake_agent import write_fake_model

LATENCY_ROUNDS = 1500
THROUGHPUT_S = 4.0
CLIENTS = 8


async def _latency(cp: ControlPlane, endpoint: str) -> None:
    headers = {"Authorization": f"Key {cp.key}"}
    direct: list[float] = []
    proxied: list[float] = []
    async with aiohttp.ClientSession() as s:
        for i in range(LATENCY_ROUNDS + 100):
            # Alternate so both see the same machine state, side by side.
            for target, out in ((endpoint + "/run", direct), (cp.base + "/model/run", proxied)):
                body = {"prompt": "hi"} if target.endswith("/run") and "model" not in target else {}
                if "/model/" in target:
                    body = {"model": "bench/fast", "prompt": "hi"}
                t0 = time.perf_counter()
                async with s.post(target, json=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                if i >= 100:
                    out.append((time.perf_counter() - t0) * 1000)
    d50, d99 = percentile(direct, 0.5), percentile(direct, 0.99)
    p50, p99 = percentile(proxied, 0.5), percentile(proxied, 0.99)
    print(
        f"proxy latency: added p50 {p50 - d50:.2f} ms (goal <= 0.5), added p99 {p99 - d99:.2f} ms"
        f" [direct p50 {d50:.2f} / p99 {d99:.2f} ms; proxied p50 {p50:.2f} / p99 {p99:.2f} ms;"
        f" ratio p50 {p50 / d50:.2f}x]"
    )


async def _load(url: str, body: dict[str, object], headers: dict[str, str], stream: bool) -> int:
    """Requests (or streamed tokens) completed by CLIENTS workers in THROUGHPUT_S."""
    done = 0
    deadline = time.perf_counter() + THROUGHPUT_S
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                async with s.post(url, json=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    if stream:
                        async for _ in r.content.iter_any():
                            pass
                    else:
                        await r.read()
                done += 1

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return done


async def _throughput(cp: ControlPlane, endpoint: str, model: str, stream: bool) -> float:
    headers = {"Authorization": f"Key {cp.key}"}
    path = "/stream" if stream else "/run"
    direct_total = proxied_total = 0
    for _ in range(2):
        direct_total += await _load(endpoint + path, {"prompt": "x"}, headers, stream)
        proxied_total += await _load(
            cp.base + "/model/run", {"model": model, "prompt": "x", "stream": stream}, headers,
            stream,
        )
    return proxied_total / direct_total, direct_total, proxied_total


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        write_fake_model(models, "bench/fast", "ok", delay_s=0.0)
        write_fake_model(models, "bench/twenty-ms", "ok", delay_s=0.02)
        write_fake_model(models, "bench/stream", "ok", delay_s=0.0, tokens=200)
        with control_plane(
            [models], fake_agent=FAKE_AGENT, MLCP_MAX_QUEUE="64",
            MLCP_INCLUDE_PACKAGED_MODELS="false",
        ) as cp:
            endpoints = {}
            for model, conc in (("bench/fast", 1), ("bench/twenty-ms", 8), ("bench/stream", 8)):
                cp.call("/model/load", {"model": model, "concurrency": conc})
            for model in ("bench/fast", "bench/twenty-ms", "bench/stream"):
                endpoints[model] = str(cp.wait_running(model)["endpoint"])
            asyncio.run(_latency(cp, endpoints["bench/fast"]))
            ratio, d, p = asyncio.run(_throughput(cp, endpoints["bench/twenty-ms"], "bench/twenty-ms", False))
            print(
                f"proxy throughput ({CLIENTS} clients, 20 ms instance): proxied/direct = "
                f"{ratio:.2f} (goal >= 0.9) [direct {d / (2 * THROUGHPUT_S):.0f} req/s, "
                f"proxied {p / (2 * THROUGHPUT_S):.0f} req/s]"
            )
            ratio, d, p = asyncio.run(_throughput(cp, endpoints["bench/stream"], "bench/stream", True))
            print(
                f"proxy streaming ({CLIENTS} streams of 200 chunks): proxied/direct = {ratio:.2f}"
                f" (goal >= 0.95) [direct {d / (2 * THROUGHPUT_S):.1f} streams/s, proxied "
                f"{p / (2 * THROUGHPUT_S):.1f} streams/s]"
            )


if __name__ == "__main__":
    main()
