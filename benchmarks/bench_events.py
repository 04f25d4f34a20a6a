"""/events fan-out: 200 subscribers on one control plane; time from a transition (its event's
database timestamp, taken inside the transaction, so a little before the commit) to the moment
the last subscriber has it. Prints p50 and p99 over every event of a few load/stop cycles."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from benchmarks.harness import FAKE_AGENT, ControlPlane, control_plane, percentile
from tests.fake_agent import write_fake_model

SUBSCRIBERS = int(os.environ.get("BENCH_EVENTS_SUBSCRIBERS", "200"))
CYCLES = int(os.environ.get("BENCH_EVENTS_CYCLES", "5"))
MODEL = "fake/events"


async def _subscriber(
    session: aiohttp.ClientSession,
    cp: ControlPlane,
    seen: dict[int, list[float]],
    ready: list[int],
    all_ready: asyncio.Event,
) -> None:
    headers = {"Authorization": f"Key {cp.key}", "Accept": "text/event-stream"}
    async with session.get(cp.base + "/events", headers=headers) as resp:
        resp.raise_for_status()
        ready.append(1)
        if len(ready) == SUBSCRIBERS:
            all_ready.set()
        data = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data = line[5:].strip()
            elif not line and data:
                event = json.loads(data)
                seen.setdefault(event["id"], []).append(time.time())
                seen.setdefault(-event["id"], [datetime.fromisoformat(event["at"]).timestamp()])
                data = ""


async def _run(cp: ControlPlane) -> list[float]:
    seen: dict[int, list[float]] = {}
    ready: list[int] = []
    all_ready = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [
            asyncio.create_task(_subscriber(session, cp, seen, ready, all_ready))
            for _ in range(SUBSCRIBERS)
        ]
        await asyncio.wait_for(all_ready.wait(), 60)
        await asyncio.sleep(0.5)
        for _ in range(CYCLES):
            await asyncio.to_thread(cp.call, "/model/load", {"model": MODEL})
            await asyncio.to_thread(cp.wait_running, MODEL)
            await asyncio.to_thread(cp.call, "/model/delete", {"model": MODEL})
        deadline = time.monotonic() + 30
        ids = [i for i in seen if i > 0]
        while time.monotonic() < deadline and any(len(seen[i]) < SUBSCRIBERS for i in ids):
            await asyncio.sleep(0.1)
            ids = [i for i in seen if i > 0]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lags = []
    for event_id in (i for i in seen if i > 0):
        if len(seen[event_id]) < SUBSCRIBERS:
            raise RuntimeError(f"event {event_id} reached {len(seen[event_id])} subscribers")
        lags.append(max(seen[event_id]) - seen[-event_id][0])
    return lags


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        write_fake_model(models, MODEL)
        with control_plane(
            [models], fake_agent=FAKE_AGENT, MLCP_INCLUDE_PACKAGED_MODELS="false"
        ) as cp:
            cp.mark_measured([MODEL], 50_000_000)
            lags = asyncio.run(_run(cp))
    print(
        f"   /events fan-out: {len(lags)} events to {SUBSCRIBERS} subscribers each; "
        f"transition -> last subscriber p50 {percentile(lags, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(lags, 0.99) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
