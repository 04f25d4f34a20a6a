"""A control plane SIGKILLed in the middle of a load (issue 17, fault suite): at each step the
next one adopts the instance or fails it with a reason, with no orphan and no duplicate; an
adopted instance keeps its expiry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from benchmarker.catalog import DEMO_MODEL
from control_plane.reconciler import GONE_REASON
from control_plane.runtimes.process import LABEL_ENV
from tests.e2e.server import Server, http, start, stop
from tests.fake_agent import write_fake_model
from tests.faults.scenario import FAKE_AGENT
from tests.harness import ADMIN_KEY, pid_alive

pytestmark = pytest.mark.faults

MODEL = "fake/slow-start"


def labelled_agents(cluster: str) -> list[int]:
    """Process-group leaders labelled as instances of this deployment."""
    found = []
    for proc in psutil.process_iter(["pid", "environ"]):
        label = (proc.info.get("environ") or {}).get(LABEL_ENV, "")
        if label.startswith(cluster + ":") and os.getpgid(proc.pid) == proc.pid:
            found.append(proc.pid)
    return found


@pytest.fixture
async def db(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_dsn)
    yield conn
    cluster = await conn.fetchval("SELECT id FROM cluster")
    for pid in labelled_agents(cluster):  # whatever failed, no agent outlives the test
        os.killpg(pid, signal.SIGKILL)
    await conn.close()


def serve_on(db_dsn: str, root: Path, tag: str) -> Server:
    return start(
        root / tag,
        root,
        tag,
        MLCP_DATABASE_URL=db_dsn,
        MLCP_ADMIN_KEY=ADMIN_KEY,
        MLCP_INCLUDE_PACKAGED_MODELS="false",
        MLCP_MODEL_DIRS=str(root / "models"),
        MLCP_AGENT_COMMAND=json.dumps(FAKE_AGENT),
        MLCP_START_TIMEOUT_S="20",
    )


async def row_of(db: asyncpg.Connection) -> Any:
    return await db.fetchrow("SELECT * FROM instances WHERE model = $1", MODEL)


async def wait_row(db: asyncpg.Connection, check: Any, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        row = await row_of(db)
        if row is not None and check(row):
            return row
        assert time.monotonic() < deadline, dict(row) if row else None
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("step", ["after spawn, before RUNNING", "while RUNNING"])
async def test_sigkill_during_a_load(
    db: asyncpg.Connection, db_dsn: str, tmp_path: Path, step: str
) -> None:
    # 3 s to become healthy: a window in which the instance is spawned but not yet RUNNING.
    write_fake_model(tmp_path / "models", MODEL, mode="ok", start_delay_s=3.0)
    first = serve_on(db_dsn, tmp_path, "first")
    await db.execute(
        "UPDATE models SET required_ram_bytes = 50000000, benchmarked_at = now() WHERE name = $1",
        MODEL,
    )
    body = {"model": MODEL, "expirationPeriodSeconds": 600}
    status, answer = await asyncio.to_thread(
        http, "POST", first.base + "/model/load", ADMIN_KEY, body
    )
    assert status == 200, answer
    if step == "while RUNNING":
        before = await wait_row(db, lambda r: r["state"] == "RUNNING")
    else:
        before = await wait_row(db, lambda r: r["handle"] is not None)
        assert before["state"] == "STARTING"
    first.proc.kill()
    first.proc.wait(10)
    pid = int(before["handle"])
    assert pid_alive(pid), "the agent died with its control plane"

    second = serve_on(db_dsn, tmp_path, "second")
    try:
        after = await wait_row(db, lambda r: r["state"] == "RUNNING")
        cluster = await db.fetchval("SELECT id FROM cluster")
        # Adopted: the same process, no second one, one row.
        assert int(after["handle"]) == pid and pid_alive(pid)
        assert labelled_agents(cluster) == [pid]
        assert await db.fetchval("SELECT count(*) FROM instances") == 1
        if step == "while RUNNING":
            assert after["expires_at"] == before["expires_at"], "adoption moved the expiry"
        run = {"model": MODEL, "prompt": "x"}
        status, out = await asyncio.to_thread(
            http, "POST", second.base + "/model/run", ADMIN_KEY, run
        )
        assert status == 200, out
    finally:
        stop(second)


def converters(data_dir: Path) -> list[psutil.Process]:
    """`python -m instance_agent convert` children writing into this data folder's store."""
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "convert" in (p.info["cmdline"] or [])
        and str(data_dir) in " ".join(p.info["cmdline"] or [])
    ]


@pytest.mark.timeout(420)
async def test_sigkill_before_spawn(db: asyncpg.Connection, db_dsn: str, tmp_path: Path) -> None:
    # The demo model is a GGUF: loaded with transformers, the launcher converts it into the
    # model store before its instance is spawned (~20 s here), and renews the STARTING row
    # meanwhile (llama.cpp, its default engine, would serve the file as is).
    (tmp_path / "models").mkdir()
    env = {"MLCP_INCLUDE_PACKAGED_MODELS": "true"}
    first = start(
        tmp_path / "first",
        tmp_path,
        "first",
        MLCP_DATABASE_URL=db_dsn,
        MLCP_ADMIN_KEY=ADMIN_KEY,
        MLCP_MODEL_DIRS=str(tmp_path / "models"),
        MLCP_AGENT_COMMAND=json.dumps(FAKE_AGENT),
        **env,
    )
    converting: list[psutil.Process] = []
    try:
        await db.execute(
            "UPDATE models SET required_ram_bytes = 600000000, benchmarked_at = now() "
            "WHERE name = $1",
            DEMO_MODEL,
        )
        body = {"model": DEMO_MODEL, "expirationPeriodSeconds": 600, "engine": "transformers"}
        status, answer = await asyncio.to_thread(
            http, "POST", first.base + "/model/load", ADMIN_KEY, body
        )
        assert status == 200, answer
        deadline = time.monotonic() + 60
        while not (converting := converters(tmp_path / "first")):
            assert time.monotonic() < deadline, "the GGUF conversion never started"
            await asyncio.sleep(0.05)
        renewed = await wait_model_row(db, lambda r: r["launch_seen_at"] is not None)
        assert renewed["state"] == "STARTING" and renewed["handle"] is None
    finally:
        first.proc.kill()
        first.proc.wait(10)

    second = serve_on(db_dsn, tmp_path, "second")
    try:
        failed = await wait_model_row(db, lambda r: r["state"] == "FAILED", timeout_s=60)
        assert failed["reason"] == GONE_REASON
        cluster = await db.fetchval("SELECT id FROM cluster")
        assert labelled_agents(cluster) == []
        assert await db.fetchval("SELECT count(*) FROM instances") == 1
        # The half-done conversion is no orphan: it finishes (or fails) and exits by itself.
        _, alive = await asyncio.to_thread(psutil.wait_procs, converting, 300)
        assert alive == []
    finally:
        stop(second)
        for proc in converting:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


async def wait_model_row(db: asyncpg.Connection, check: Any, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        row = await db.fetchrow("SELECT * FROM instances WHERE model = $1", DEMO_MODEL)
        if row is not None and check(row):
            return row
        assert time.monotonic() < deadline, dict(row) if row else None
        await asyncio.sleep(0.1)
