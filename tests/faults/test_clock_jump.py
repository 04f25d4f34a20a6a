"""A step of the control plane's wall clock (NTP, a VM resumed) neither expires instances early
nor keeps them alive (issue 17): expiry and leases are judged by the database's clock, and what
the control plane measures itself is measured on the monotonic clock.

The control plane runs under libfaketime, its wall clock moved by writing an offset to a file
while it runs; its monotonic clock, the database (this test's PostgreSQL) and the agents keep
the real time, as they do when a host's clock is stepped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.e2e.server import Server, http, start, stop
from tests.fake_agent import write_fake_model
from tests.faults.scenario import FAKE_AGENT
from tests.harness import ADMIN_KEY, pid_alive, wait_gone

pytestmark = pytest.mark.faults

MODEL = "fake/clock"
EXPIRY_S = 6
GRACE_S = 2
HOUR_S = 3600
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def jump(clock_file: Path, offset_s: int) -> None:
    """Set the control plane's wall clock to real time + offset_s (read at every clock call)."""
    clock_file.write_text(f"{offset_s:+d}\n")


async def call(server: Server, path: str, body: Any = None) -> tuple[int, Any]:
    method = "GET" if body is None else "POST"
    return await asyncio.to_thread(http, method, server.base + path, ADMIN_KEY, body)


async def wait_state(server: Server, want: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = await call(server, "/model/status", {"model": MODEL})
        if status == 200 and body["status"] == want:
            return dict(body)
        assert time.monotonic() < deadline, (status, body)
        await asyncio.sleep(0.1)


async def load(server: Server, conn: asyncpg.Connection) -> int:
    status, answer = await call(
        server, "/model/load", {"model": MODEL, "expirationPeriodSeconds": EXPIRY_S}
    )
    assert status == 200, answer
    await wait_state(server, "RUNNING", 20)
    handle = await conn.fetchval(
        "SELECT handle FROM instances WHERE model = $1 AND state = 'RUNNING'", MODEL
    )
    return int(handle)


@pytest.fixture
def libfaketime() -> Path:
    if not LIBFAKETIME.is_file():
        pytest.fail(f"{LIBFAKETIME} is missing: make test installs Debian's libfaketime")
    return LIBFAKETIME


async def test_wall_clock_steps_neither_expire_nor_keep_instances(
    db_dsn: str, tmp_path: Path, libfaketime: Path
) -> None:
    write_fake_model(tmp_path / "models", MODEL, mode="ok")
    clock = tmp_path / "clock-offset"
    jump(clock, 0)
    server = start(
        tmp_path / "data",
        tmp_path,
        "clock",
        MLCP_DATABASE_URL=db_dsn,
        MLCP_ADMIN_KEY=ADMIN_KEY,
        MLCP_INCLUDE_PACKAGED_MODELS="false",
        MLCP_MODEL_DIRS=str(tmp_path / "models"),
        # The agents keep the real clock: only the control plane's host clock is stepped.
        MLCP_AGENT_COMMAND=json.dumps(["env", "-u", "LD_PRELOAD", *FAKE_AGENT]),
        MLCP_INSTANCE_LEASE_GRACE_S=str(GRACE_S),
        LD_PRELOAD=str(libfaketime),
        FAKETIME_TIMESTAMP_FILE=str(clock),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    pids: list[int] = []
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(
            "UPDATE models SET required_ram_bytes = 50000000, benchmarked_at = now() "
            "WHERE name = $1",
            MODEL,
        )
        status, health = await call(server, "/health")
        assert status == 200, health

        # An hour ahead: a request must not push the expiry an hour out, and the instance
        # expires EXPIRY_S after it, by the database's clock.
        pids.append(await load(server, conn))
        jump(clock, HOUR_S)
        status, out = await call(server, "/model/run", {"model": MODEL, "prompt": "hi"})
        assert status == 200, out
        await asyncio.sleep(0.5)  # activity is flushed every 0.2 s
        running = await wait_state(server, "RUNNING", 1)
        expires_at = datetime.fromisoformat(running["expiresAt"].replace("Z", "+00:00"))
        db_now: datetime = await conn.fetchval("SELECT now()")
        assert 0 < (expires_at - db_now).total_seconds() <= EXPIRY_S, (expires_at, db_now)
        stopped = await wait_state(server, "STOPPED", EXPIRY_S + 6)
        assert "expired" in stopped["reason"], stopped
        await wait_gone(pids[-1], timeout_s=10)

        # An hour behind: requests a second apart keep the instance alive well past its
        # expiry (each one slides it on), and its lease is not an hour long.
        jump(clock, 0)
        pids.append(await load(server, conn))
        jump(clock, -HOUR_S)
        for _ in range(EXPIRY_S + 4):
            status, out = await call(server, "/model/run", {"model": MODEL, "prompt": "hi"})
            assert status == 200, out
            await asyncio.sleep(1)
        await wait_state(server, "RUNNING", 1)
        await asyncio.sleep(2.5)  # a health check renews the lease with the clock stepped
        server.proc.kill()
        server.proc.wait(10)
        killed = time.monotonic()
        # No control plane renews it now: it exits by max(expiry, grace) after the last
        # renewal, not an hour later.
        await wait_gone(pids[-1], timeout_s=EXPIRY_S + 8)
        assert time.monotonic() - killed < EXPIRY_S + 6
    finally:
        await conn.close()
        if server.proc.poll() is None:
            stop(server)
        for pid in pids:
            if pid_alive(pid):  # never leave an orphan, whatever failed
                os.killpg(pid, signal.SIGKILL)
        if server.proc.returncode not in (0, -signal.SIGKILL, None):
            sys.stderr.write(server.err()[-4000:])
