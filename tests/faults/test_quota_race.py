"""Two control planes on one database racing for one key's last calls of the month serve exactly
the limit between them (control_plane/quotas.py: blocks reserved by one conditional UPDATE)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tests.faults.scenario import control_plane
from tests.harness import Api, wait_status

pytestmark = pytest.mark.faults

MODEL = "fake/quota"
MODELS = {MODEL: {"mode": "ok", "delay_s": 0.002}}
LIMIT = 40
REQUESTS = 60


async def test_two_control_planes_serve_exactly_the_monthly_limit(
    db_dsn: str, tmp_path: Path
) -> None:
    async with (
        control_plane(db_dsn, tmp_path / "a", MODELS) as a,
        control_plane(db_dsn, tmp_path / "b", MODELS) as b,
    ):
        status, key = await a.call("POST", "/admin/keys", {"name": "racer", "monthlyCalls": LIMIT})
        assert status == 201, key
        status, body = await a.call("POST", "/model/load", {"model": MODEL, "concurrency": 16})
        assert status == 200, body
        await wait_status(a, MODEL, "RUNNING")
        gates = {id(a): asyncio.Semaphore(8), id(b): asyncio.Semaphore(8)}

        async def one(api: Api) -> tuple[int, str | None]:
            async with gates[id(api)]:
                status, body = await api.call(
                    "POST", "/model/run", {"model": MODEL, "prompt": "x"}, key=key["key"]
                )
            return status, body.get("code") if status != 200 else None

        # Alternating, all at once: each control plane reserves blocks while the other does.
        results = await asyncio.gather(*(one(a if i % 2 else b) for i in range(REQUESTS)))
        served = sum(1 for status, _ in results if status == 200)
        refused = [code for status, code in results if status != 200]
        assert served == LIMIT, results
        assert refused == ["quota_exceeded"] * (REQUESTS - LIMIT), results
        # Both report them all once the other's calls are written (each flushes every second).
        await asyncio.sleep(1.5)
        for api in (a, b):
            status, usage = await api.call("GET", "/usage")
            assert status == 200
            racer = next(k for k in usage["keys"] if k["id"] == key["id"])
            assert (racer["calls"], racer["remaining"]) == (LIMIT, 0), racer
    # Both shut down: nothing is left held.
    conn = await asyncpg.connect(db_dsn)
    try:
        row = await conn.fetchrow("SELECT calls, held FROM key_usage WHERE key_id = $1", key["id"])
    finally:
        await conn.close()
    assert (row["calls"], row["held"]) == (LIMIT, 0)


async def test_calls_held_by_an_idle_control_plane_go_back(db_dsn: str, tmp_path: Path) -> None:
    async with (
        control_plane(db_dsn, tmp_path / "a", MODELS) as a,
        control_plane(db_dsn, tmp_path / "b", MODELS) as b,
    ):
        status, key = await a.call("POST", "/admin/keys", {"name": "racer", "monthlyCalls": 8})
        assert status == 201, key
        assert (await a.call("POST", "/model/load", {"model": MODEL}))[0] == 200
        await wait_status(a, MODEL, "RUNNING")
        # A reserves a block (a quarter of 8: 2) and serves one of it.
        run = {"model": MODEL, "prompt": "x"}
        assert (await a.call("POST", "/model/run", run, key=key["key"]))[0] == 200
        served = 1
        for _ in range(7):
            status, _ = await b.call("POST", "/model/run", run, key=key["key"])
            served += status == 200
        # A still holds its unserved call: B served all but it.
        assert served == 7
        assert (await b.call("POST", "/model/run", run, key=key["key"]))[0] == 429
        # After 10 s idle A gives it back, and B may serve it.
        for _ in range(60):
            await asyncio.sleep(0.5)
            status, _ = await b.call("POST", "/model/run", run, key=key["key"])
            if status == 200:
                break
        assert status == 200
