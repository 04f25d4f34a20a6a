"""Proxy overhead: /model/run through the control plane vs the same fake agent called directly.

Prints added latency (p50, p99) for a fast instance, throughput proxied ÷ direct at 8 concurrent
clients against a 20 ms instance, and streaming throughput proxied ÷ direct.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.harness import FAKE_AGENT, ControlPlane, control_plane, percentile
from tests.fake_agent import write_fake_model

LATENCY_ROUNDS = 1500
# Throughput is measured in short direct/proxied pairs, alternating which goes first: other work
# on a shared 2-core box shifts over seconds, and two long sequential rounds per side let one
# burst of it land on one side only (direct streaming read 88 and 224 streams/s in two runs).
THROUGHPUT_PAIRS = 6
THROUGHPUT_S = 1.5
CLIENTS = 8
STREAM_TOKENS = 200


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


async def _throughput(
    cp: ControlPlane, endpoint: str, model: str, stream: bool
) -> tuple[float, int, int, list[float]]:
    """Proxied ÷ direct over all pairs, the totals, and each pair's own ratio (the spread)."""
    headers = {"Authorization": f"Key {cp.key}"}
    path = "/stream" if stream else "/run"
    direct_total = proxied_total = 0
    pair_ratios: list[float] = []
    for i in range(THROUGHPUT_PAIRS):
        sides: list[tuple[str, dict[str, object]]] = [
            (endpoint + path, {"prompt": "x"}),
            (cp.base + "/model/run", {"model": model, "prompt": "x", "stream": stream}),
        ]
        counts: dict[str, int] = {}
        for url, body in sides if i % 2 == 0 else sides[::-1]:
            counts[url] = await _load(url, body, headers, stream)
        direct, proxied = counts[sides[0][0]], counts[sides[1][0]]
        direct_total += direct
        proxied_total += proxied
        pair_ratios.append(proxied / direct)
    return proxied_total / direct_total, direct_total, proxied_total, pair_ratios


async def _check_stream(cp: ControlPlane, model: str) -> None:
    """The proxied stream carries every token, however it groups them into chunks."""
    headers = {"Authorization": f"Key {cp.key}"}
    body = {"model": model, "prompt": "x", "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(cp.base + "/model/run", json=body, headers=headers) as r:
            text = (await r.read()).decode()
    assert text == "".join(f"tok{i} " for i in range(STREAM_TOKENS)), text[-200:]


def _spread(ratios: list[float]) -> str:
    return f"pairs {min(ratios):.2f}..{max(ratios):.2f}"


def _run_all(cp: ControlPlane, names: tuple[str, ...]) -> None:
    endpoints: dict[str, str] = {}
    cp.mark_measured(list(names), 50_000_000)
    for model, conc in zip(names, (1, 8, 8), strict=True):
        cp.call("/model/load", {"model": model, "concurrency": conc})
    for model in names:
        endpoints[model] = str(cp.wait_running(model)["endpoint"])
    asyncio.run(_latency(cp, endpoints["bench/fast"]))
    seconds = THROUGHPUT_PAIRS * THROUGHPUT_S
    ratio, d, p, pairs = asyncio.run(
        _throughput(cp, endpoints["bench/twenty-ms"], "bench/twenty-ms", False)
    )
    print(
        f"proxy throughput ({CLIENTS} clients, 20 ms instance): proxied/direct = "
        f"{ratio:.2f} (goal >= 0.9) [direct {d / seconds:.0f} req/s, "
        f"proxied {p / seconds:.0f} req/s; {_spread(pairs)}]"
    )
    asyncio.run(_check_stream(cp, "bench/stream"))
    ratio, d, p, pairs = asyncio.run(
        _throughput(cp, endpoints["bench/stream"], "bench/stream", True)
    )
    print(
        f"proxy streaming ({CLIENTS} streams of {STREAM_TOKENS} chunks): proxied/direct = "
        f"{ratio:.2f} (goal >= 0.95) [direct {d / seconds:.1f} streams/s, proxied "
        f"{p / seconds:.1f} streams/s; {_spread(pairs)}]"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        write_fake_model(models, "bench/fast", "ok", delay_s=0.0)
        write_fake_model(models, "bench/twenty-ms", "ok", delay_s=0.02)
        write_fake_model(models, "bench/stream", "ok", delay_s=0.0, tokens=STREAM_TOKENS)
        with control_plane(
            [models],
            fake_agent=FAKE_AGENT,
            MLCP_MAX_QUEUE="64",
            MLCP_INCLUDE_PACKAGED_MODELS="false",
        ) as cp:
            # A control plane's shutdown no longer stops its instances (the next one adopts
            # them), so the benchmark deletes what it loaded.
            names = ("bench/fast", "bench/twenty-ms", "bench/stream")
            try:
                _run_all(cp, names)
            finally:
                for model in names:
                    with contextlib.suppress(OSError):
                        cp.call("/model/delete", {"model": model})


if __name__ == "__main__":
    main()
