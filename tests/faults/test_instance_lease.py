"""Instances outlive a killed control plane only until their lease lapses (issue 17, defect 8).

A real control plane subprocess launches a fake agent, renews its lease at every health check,
and is SIGKILLed; the agent then exits by itself once the lease (its expiry, or the grace
period if later) has lapsed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.server import http, start
from tests.fake_agent import write_fake_model
from tests.faults.scenario import FAKE_AGENT
from tests.harness import ADMIN_KEY, pid_alive, wait_gone

pytestmark = pytest.mark.faults

MODEL = "fake/leased"
GRACE_S = 2


async def test_agent_exits_once_no_control_plane_renews_it(db_dsn: str, tmp_path: Path) -> None:
    write_fake_model(tmp_path / "models", MODEL, mode="ok")
    server = start(
        tmp_path / "data",
        tmp_path,
        "leaser",
        MLCP_DATABASE_URL=db_dsn,
        MLCP_ADMIN_KEY=ADMIN_KEY,
        MLCP_INCLUDE_PACKAGED_MODELS="false",
        MLCP_MODEL_DIRS=str(tmp_path / "models"),
        MLCP_AGENT_COMMAND=json.dumps(FAKE_AGENT),
        MLCP_INSTANCE_LEASE_GRACE_S=str(GRACE_S),
    )
    pid = None
    try:
        conn = await asyncpg.connect(db_dsn)
        try:
            await conn.execute(
                "UPDATE models SET required_ram_bytes = 50000000, benchmarked_at = now() "
                "WHERE name = $1",
                MODEL,
            )
            body = {"model": MODEL, "expirationPeriodSeconds": 4}
            status, answer = await asyncio.to_thread(
                http, "POST", server.base + "/model/load", ADMIN_KEY, body
            )
            assert status == 200, answer
            deadline = time.monotonic() + 15
            while True:
                row = await conn.fetchrow(
                    "SELECT state, handle FROM instances WHERE model = $1", MODEL
                )
                if row is not None and row["state"] == "RUNNING":
                    break
                assert time.monotonic() < deadline, row
                await asyncio.sleep(0.1)
            pid = int(row["handle"])
        finally:
            await conn.close()
        # Past the lease the agent started with (the grace period): renewals keep it alive.
        await asyncio.sleep(GRACE_S + 1.0)
        assert pid_alive(pid), "the agent exited although a control plane renewed its lease"
    finally:
        server.proc.kill()
        server.proc.wait(10)
    assert pid is not None
    killed = time.monotonic()
    # No control plane renews it now: it exits by itself by max(expiry, grace) after the last
    # renewal (health checks every 2 s), not with the control plane and not never.
    try:
        await wait_gone(pid, timeout_s=10)
        assert time.monotonic() - killed < 8
    finally:
        if pid_alive(pid):  # never leave an orphan behind, whatever failed
            os.killpg(pid, signal.SIGKILL)
