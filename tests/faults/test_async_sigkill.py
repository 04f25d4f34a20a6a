"""A control plane SIGKILLed while an async request is processing: the next one (sharing the
database) reclaims it after the lease and finishes it; none is left in `processing`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.e2e.server import Server, http, start, stop
from tests.fake_agent import write_fake_model
from tests.harness import ADMIN_KEY, pid_alive

pytestmark = pytest.mark.faults

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]


def _env(db_dsn: str, models: Path, **extra: str) -> dict[str, str]:
    return {
        "MLCP_DATABASE_URL": db_dsn,
        "MLCP_ADMIN_KEY": ADMIN_KEY,
        "MLCP_MODEL_DIRS": str(models),
        "MLCP_AGENT_COMMAND": json.dumps(FAKE_AGENT),
        "MLCP_INCLUDE_PACKAGED_MODELS": "false",
        "MLCP_ASYNC_LEASE_S": "1.5",
        "MLCP_START_TIMEOUT_S": "10",
        **extra,
    }


def _poll(server: Server, rid: str, want: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = http("GET", f"{server.base}/v1/async/requests/{rid}", ADMIN_KEY)
        assert status == 200, body
        if body["status"] in want:
            return body
        time.sleep(0.05)
    raise AssertionError(f"{rid} never reached {want}: {body}\n{server.err()[-3000:]}")


async def _agent_pids(db_dsn: str) -> list[int]:
    conn = await asyncpg.connect(db_dsn)
    try:
        rows = await conn.fetch("SELECT handle FROM instances WHERE handle IS NOT NULL")
    finally:
        await conn.close()
    return [int(r["handle"]) for r in rows if str(r["handle"]).isdigit()]


async def _mark_measured(db_dsn: str, model: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute(
            "UPDATE models SET required_ram_bytes = 50000000, benchmarked_at = now() "
            "WHERE name = $1",
            model,
        )
    finally:
        await conn.close()


async def test_a_request_outlives_its_sigkilled_control_plane(db_dsn: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    # 2.5 s a request: long enough to kill its control plane mid-request.
    write_fake_model(models, "fake/slow", mode="slow", delay_s=0.25, tokens=10)
    first = start(tmp_path / "a", tmp_path, "first", **_env(db_dsn, models))
    second = None
    try:
        await _mark_measured(db_dsn, "fake/slow")
        status, body = http(
            "POST", f"{first.base}/v1/async/fake/slow", ADMIN_KEY, {"input": {"prompt": "hi"}}
        )
        assert status == 202, body
        rid = body["response"]["id"]
        _poll(first, rid, ("processing",), 30)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)

        second = start(
            tmp_path / "b",
            tmp_path,
            "second",
            **_env(db_dsn, models, MLCP_STOP_INSTANCES_ON_EXIT="true"),
        )
        done = _poll(second, rid, ("success", "failed", "cancelled"), 30)
        assert done["status"] == "success", done
        assert done["result"]["text"] == "echo: hi"
        assert done["attempts"] == 2, done
    finally:
        for server in (second, first):
            if server is not None:
                stop(server)
        for pid in await _agent_pids(db_dsn):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0)
