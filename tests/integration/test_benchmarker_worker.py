"""The standalone worker (`python -m benchmarker worker`) killed mid-job: its job is reclaimed,
its measuring child dies with it, and its late result is refused."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import asyncpg
import psutil

from benchmarker.estimate import Phase, Profile
from benchmarker.worker import Worker
from db import queries
from db.rows import ModelJobRow
from tests.fake_agent import write_fake_model

REPO = Path(__file__).resolve().parents[2]
FAKE_AGENT = [sys.executable, str(REPO / "tests" / "fake_agent.py")]
PROFILE = Profile("cpu", 0.5, 300_000_000, (Phase(1, 400_000_000, None, 8, 0.5),))


async def job_row(db: asyncpg.Pool, job_id: int) -> ModelJobRow:
    return ModelJobRow.of(await db.fetchrow("SELECT * FROM model_jobs WHERE id = $1", job_id))


def worker_env(db_dsn: str, tmp_path: Path, models: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLCP_DATABASE_URL": db_dsn,
        "MLCP_DATA_DIR": str(tmp_path / "data"),
        "MLCP_MODEL_DIRS": str(models),
        "MLCP_HF_CACHE_DIR": str(tmp_path / "hf-cache"),
        "MLCP_INCLUDE_PACKAGED_MODELS": "false",
        "MLCP_AGENT_COMMAND": json.dumps(FAKE_AGENT),
    }


async def start_worker(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarker",
            "worker",
            "--grace-s",
            "0.5",
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def test_killed_worker_is_reclaimed_and_its_late_result_refused(
    db: asyncpg.Pool, db_dsn: str, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    # An agent that never becomes ready keeps the worker mid-job for as long as the test needs.
    write_fake_model(models, "fake/stuck", mode="never_healthy")
    queued = await queries.enqueue_model_job(db, "fake/stuck")
    assert queued is not None
    log_path = tmp_path / "worker.log"
    proc = await start_worker(worker_env(db_dsn, tmp_path, models), log_path)
    try:
        agent: psutil.Process | None = None
        for _ in range(300):
            row = await job_row(db, queued.id)
            children = psutil.Process(proc.pid).children()
            if row.state == "benchmarking" and children:
                agent = children[0]
                break
            assert proc.returncode is None, "the worker exited; see worker.log"
            await asyncio.sleep(0.05)
        assert agent is not None, "the worker never started measuring"
        held = await job_row(db, queued.id)
        assert held.lease_token is not None and held.worker_id is not None

        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        # The measuring agent does not outlive its worker (PR_SET_PDEATHSIG).
        gone, _ = await asyncio.to_thread(psutil.wait_procs, [agent], 10)
        assert gone, "the measuring agent outlived its worker"

        # No heartbeat comes any more; move it back instead of waiting for it to go stale.
        await db.execute(
            "UPDATE model_jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = $1",
            queued.id,
        )
        successor = Worker(db, _returns(PROFILE), worker_id="successor")
        taken = await successor.claim()
        assert taken is not None and taken.id == queued.id
        assert taken.attempts == 2 and taken.lease_token != held.lease_token

        # Whatever the dead worker would still report is refused.
        assert await queries.finish_model_job(db, held.id, held.lease_token, "available") is None
        assert not await queries.heartbeat_model_job(db, held.id, held.lease_token)
        assert (await job_row(db, held.id)).worker_id == "successor"

        await successor.process(taken)
        assert (await job_row(db, held.id)).state == "available"
    finally:
        await stop(proc)


async def test_sigterm_hands_the_job_back(db: asyncpg.Pool, db_dsn: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_fake_model(models, "fake/stuck", mode="never_healthy")
    queued = await queries.enqueue_model_job(db, "fake/stuck")
    assert queued is not None
    proc = await start_worker(worker_env(db_dsn, tmp_path, models), tmp_path / "worker.log")
    try:
        for _ in range(300):
            if (await job_row(db, queued.id)).state == "benchmarking":
                break
            await asyncio.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        row = await job_row(db, queued.id)
        assert (row.state, row.attempts, row.lease_token) == ("queued", 0, None)
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 10)
        assert alive == []
    finally:
        await stop(proc)


def _returns(profile: Profile):  # type: ignore[no-untyped-def]
    async def bench(job: ModelJobRow) -> Profile:
        return profile

    return bench
