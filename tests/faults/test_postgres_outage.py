"""PostgreSQL stopped and started under traffic (issue 17, defect 6 and the fault suite).

While the database is down: requests needing it answer 503 with Retry-After within 1 s; a
running instance keeps serving keys verified before the outage (stale-while-error); the log says
so once, not once per request. When it returns: everything acknowledged is still there, and
the same control plane serves again without a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.e2e.server import http, start, stop
from tests.fake_agent import write_fake_model
from tests.faults.postgres import OwnPostgres
from tests.faults.scenario import FAKE_AGENT, control_plane, migrated
from tests.harness import ADMIN_KEY, Api, load, wait_status

pytestmark = pytest.mark.faults

MODEL = "fake/ok"


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[OwnPostgres]:
    server = OwnPostgres(tmp_path)
    yield server
    server.close()


async def timed(
    api: Api, method: str, path: str, body: object = None, key: str = ADMIN_KEY
) -> tuple[int, Any, Any, float]:
    """One request: (status, JSON body, headers, seconds it took)."""
    started = time.perf_counter()
    async with api.session.request(
        method,
        api.base + path,
        json=body,
        headers=api.headers(key),
        timeout=aiohttp.ClientTimeout(total=10),
    ) as resp:
        payload = await resp.json(content_type=None)
        return resp.status, payload, resp.headers, time.perf_counter() - started


async def test_outage_under_traffic(
    own_pg: OwnPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await migrated(own_pg.dsn)
    async with control_plane(
        own_pg.dsn, tmp_path, {MODEL: {"mode": "ok", "delay_s": 0.005}}, auth_cache_s=0.5
    ) as api:
        await load(api, MODEL, expirationPeriodSeconds=600)
        await wait_status(api, MODEL, "RUNNING")
        status, user = await api.call("POST", "/admin/keys", {"name": "known"})
        assert status == 201
        acknowledged = [user["id"]]
        run = {"model": MODEL, "prompt": "hi"}
        assert (await api.call("POST", "/model/run", run, key=user["key"]))[0] == 200

        own_pg.stop()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            outage_end = time.monotonic() + 4.0  # 8x the auth cache's freshness
            served = refused = 0
            while time.monotonic() < outage_end:
                status, body, headers, took = await timed(
                    api, "POST", "/model/run", run, key=user["key"]
                )
                assert status == 200, body
                served += 1
                status, body, headers, took = await timed(api, "GET", "/model/list")
                assert (status, body["code"]) == (503, "database_unavailable"), body
                assert took < 1.0, f"a 503 took {took:.2f} s"
                assert int(headers["Retry-After"]) >= 1
                refused += 1
                await asyncio.sleep(0.05)
            # A key never seen before cannot be verified: 503, not 401 and not 200.
            status, body, headers, _ = await timed(
                api, "POST", "/model/run", run, key="mlcp_never-seen-before-key-0000000000"
            )
            assert status == 503 and "Retry-After" in headers, body
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert tracebacks == [], [r.getMessage() for r in tracebacks][:5]
        outage_lines = [r for r in caplog.records if "database" in r.getMessage().lower()]
        assert 1 <= len(outage_lines) <= 3, [r.getMessage() for r in outage_lines]
        assert served > 10 and refused > 10

        own_pg.start()
        deadline = time.monotonic() + 15
        while True:
            status, body, _, _ = await timed(api, "GET", "/model/list")
            if status == 200:
                break
            assert time.monotonic() < deadline, f"no recovery: {body}"
            await asyncio.sleep(0.2)
        status, listing = await api.call("GET", "/admin/keys")
        assert status == 200
        assert set(acknowledged) <= {k["id"] for k in listing}
        assert (await api.call("POST", "/model/run", run, key=user["key"]))[0] == 200
        # The loops notice the return within a pass or two, and say so once.
        for _ in range(50):
            if any("reachable again" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the end of the outage was not logged")


async def test_sigterm_during_an_outage_exits_and_loses_nothing(
    own_pg: OwnPostgres, tmp_path: Path
) -> None:
    """A control plane told to stop while its database is down exits within the stop deadline
    (no flush or hand-back waits forever on a dead connection); its instance keeps running and
    the next control plane, once the database is back, adopts it with its counters."""
    await migrated(own_pg.dsn)
    write_fake_model(tmp_path / "models", MODEL, mode="ok")
    env = {
        "MLCP_DATABASE_URL": own_pg.dsn,
        "MLCP_ADMIN_KEY": ADMIN_KEY,
        "MLCP_INCLUDE_PACKAGED_MODELS": "false",
        "MLCP_MODEL_DIRS": str(tmp_path / "models"),
        "MLCP_AGENT_COMMAND": json.dumps(FAKE_AGENT),
    }
    first = start(tmp_path / "first", tmp_path, "first", **env)
    try:
        conn = await asyncpg.connect(own_pg.dsn)
        try:
            await conn.execute(
                "UPDATE models SET required_ram_bytes = 50000000, benchmarked_at = now()"
            )
        finally:
            await conn.close()
        body = {"model": MODEL, "expirationPeriodSeconds": 600}
        assert (await asyncio.to_thread(http, "POST", first.base + "/model/load", ADMIN_KEY, body))[
            0
        ] == 200
        for _ in range(200):
            _, status = await asyncio.to_thread(
                http, "POST", first.base + "/model/status", ADMIN_KEY, {"model": MODEL}
            )
            if status["status"] == "RUNNING":
                break
            await asyncio.sleep(0.1)
        assert status["status"] == "RUNNING", status
        run = {"model": MODEL, "prompt": "x"}
        for _ in range(3):
            code, out = await asyncio.to_thread(
                http, "POST", first.base + "/model/run", ADMIN_KEY, run
            )
            assert code == 200, out
        await asyncio.sleep(0.5)  # the activity flush writes the three inferences
        own_pg.stop()
        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(first.proc.wait, 40)
        # uvicorn ends by re-raising the SIGTERM it handled: -15 is its clean exit.
        assert time.monotonic() - started < 40 and code in (0, -signal.SIGTERM), code
        log = first.err()
        assert "Application shutdown complete" in log and "Traceback" not in log, log[-3000:]
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    own_pg.start()
    second = start(tmp_path / "second", tmp_path, "second", **env)
    try:
        _, after = await asyncio.to_thread(
            http, "POST", second.base + "/model/status", ADMIN_KEY, {"model": MODEL}
        )
        assert after["status"] == "RUNNING", after
        code, out = await asyncio.to_thread(
            http, "POST", second.base + "/model/run", ADMIN_KEY, run
        )
        assert code == 200, out
        _, listed = await asyncio.to_thread(
            http, "GET", second.base + "/model/instances", ADMIN_KEY
        )
        assert listed[0]["inferences"] >= 4, listed
        code, _ = await asyncio.to_thread(
            http, "POST", second.base + "/model/delete", ADMIN_KEY, {"model": MODEL}
        )
        assert code == 200
    finally:
        stop(second)
