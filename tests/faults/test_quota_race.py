"""Two control planes on one database racing for one key's last calls of the month serve exactly
the limit between them (control_plane/quotas.py: blocks reserved by one conditional UPDATE)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import psutil
import pytest

from tests.e2e.server import http, start
from tests.faults.scenario import FAKE_AGENT, control_plane
from tests.harness import ADMIN_KEY, Api, wait_status

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


async def test_a_killed_control_plane_leaves_at_most_its_block_unserved(
    db_dsn: str, tmp_path: Path
) -> None:
    """The bound stated in the README: a control plane SIGKILLed while it holds a key's calls
    takes at most MLCP_QUOTA_BLOCK_CALLS of them with it; never is more than the limit served."""
    block, limit = 10, 100
    try:
        await _serve_until_spent(db_dsn, tmp_path, block, limit)
    finally:
        # The killed control plane's agent outlives it (by design); not the test.
        for proc in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
                proc.kill()


async def _serve_until_spent(db_dsn: str, tmp_path: Path, block: int, limit: int) -> None:
    async with control_plane(db_dsn, tmp_path / "b", MODELS, quota_block_calls=block) as b:
        status, key = await b.call("POST", "/admin/keys", {"name": "held", "monthlyCalls": limit})
        assert status == 201, key
        first = start(
            tmp_path / "a-data",
            tmp_path,
            "a",
            MLCP_DATABASE_URL=db_dsn,
            MLCP_ADMIN_KEY=ADMIN_KEY,
            MLCP_INCLUDE_PACKAGED_MODELS="false",
            MLCP_MODEL_DIRS=str(tmp_path / "b" / "models"),
            MLCP_AGENT_COMMAND=json.dumps(FAKE_AGENT),
            MLCP_QUOTA_BLOCK_CALLS=str(block),
            MLCP_GRPC_PORT="0",
        )
        try:
            status, body = await asyncio.to_thread(
                http, "POST", first.base + "/model/load", ADMIN_KEY, {"model": MODEL}
            )
            assert status == 200, body
            await wait_status(b, MODEL, "RUNNING")
            run = {"model": MODEL, "prompt": "x"}
            for _ in range(3):
                status, body = await asyncio.to_thread(
                    http, "POST", first.base + "/model/run", key["key"], run
                )
                assert status == 200, body
        finally:
            first.proc.kill()
            first.proc.wait(10)
        served = 0
        while True:
            status, body = await b.call("POST", "/model/run", run, key=key["key"])
            if status != 200:
                break
            served += 1
        assert status == 429 and body["code"] == "quota_exceeded", body
        # The killed one held a block: 3 of it served, 7 never will be this month.
        assert served == limit - block
    conn = await asyncpg.connect(db_dsn)
    try:
        row = await conn.fetchrow("SELECT calls, held FROM key_usage WHERE key_id = $1", key["id"])
    finally:
        await conn.close()
    assert row["calls"] + row["held"] == limit and row["held"] <= block
