"""Per-key limits on the hot path (issue 14): `/model/run` p50 with limits on ÷ off (goal <= 1.05).

One control plane and one fast fake agent; two user keys called in turn, one with every limit
set (a monthly quota, requests per minute, concurrent streams: the quota's blocks reserved from
PostgreSQL, the per-minute window kept in memory), one with none (only counted for /usage). The
limits are high enough never to refuse, so both sides do the same work but the checks.
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

FAST = "bench/fast"
RUN_ROUNDS = 1500
WARM_UP = 100
LIMITS = {"monthlyCalls": 1_000_000_000, "requestsPerMinute": 100_000, "concurrentStreams": 100}


def _key(cp: ControlPlane, name: str, **limits: int) -> str:
    answer = cp.call("/admin/keys", {"name": name, "scope": "user", **limits})
    assert isinstance(answer, dict), answer
    return str(answer["key"])


async def _limits_cost(cp: ControlPlane, on_key: str, off_key: str) -> None:
    timings: dict[str, list[float]] = {"on": [], "off": []}
    body = {"model": FAST, "prompt": "hi"}
    async with aiohttp.ClientSession() as s:
        for i in range(RUN_ROUNDS + WARM_UP):
            sides = [("on", on_key), ("off", off_key)]
            for name, key in sides if i % 2 == 0 else sides[::-1]:
                headers = {"Authorization": f"Key {key}"}
                t0 = time.perf_counter()
                async with s.post(cp.base + "/model/run", json=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                    assert ("RateLimit-Limit" in r.headers) == (name == "on"), r.headers
                if i >= WARM_UP:
                    timings[name].append((time.perf_counter() - t0) * 1000)
    p50_on, p50_off = percentile(timings["on"], 0.5), percentile(timings["off"], 0.5)
    p99_on, p99_off = percentile(timings["on"], 0.99), percentile(timings["off"], 0.99)
    print(
        f"/model/run p50 with limits on / off: {p50_on / p50_off:.3f} (goal <= 1.05)"
        f" [on p50 {p50_on:.2f} / p99 {p99_on:.2f} ms; off p50 {p50_off:.2f} / p99"
        f" {p99_off:.2f} ms; {RUN_ROUNDS} requests each, fast fake agent]"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fake = Path(tmp) / "fake"
        write_fake_model(fake, FAST, "ok", delay_s=0.0)
        with control_plane(
            [fake], fake_agent=FAKE_AGENT, MLCP_INCLUDE_PACKAGED_MODELS="false"
        ) as cp:
            try:
                cp.mark_measured([FAST], 50_000_000)
                cp.call("/model/load", {"model": FAST, "concurrency": 4})
                cp.wait_running(FAST)
                on_key, off_key = _key(cp, "limited", **LIMITS), _key(cp, "unlimited")
                asyncio.run(_limits_cost(cp, on_key, off_key))
            finally:
                with contextlib.suppress(OSError):
                    cp.call("/model/delete", {"model": FAST})


if __name__ == "__main__":
    main()
