"""The benchmark worker: claims model jobs from PostgreSQL, measures them, records the outcome.

Claims use `FOR UPDATE SKIP LOCKED`, so any number of workers (inside control planes or started
with `python -m benchmarker worker`) share one queue. Each claim carries a fresh lease token;
heartbeats, results and retries are conditional on it, so a worker that stalled past the stale
limit and lost its job to another cannot overwrite the new holder's result. The loop follows
procrastinate's worker: wait on "work, interval or stop", finish or hand back the current job
when stopping, and never die on one job's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from benchmarker import BenchmarkError, LoadFailed, OutOfMemory
from benchmarker.estimate import Profile, minimum_bytes, phases_json, required_ram_bytes
from benchmarker.measure import Target, measure
from benchmarker.settings import BenchmarkerSettings
from benchmarker.sources import resolve
from db import DatabaseUnavailable, queries
from db.pool import Pool
from db.rows import ModelJobRow
from instance_agent.zygote_client import Zygote

logger = logging.getLogger(__name__)

CHANNEL = "mlcp_model_jobs"  # NOTIFY'd by a trigger whenever a job becomes queued
POLL_INTERVAL_S = 2.0
HEARTBEAT_S = 5.0
# Six missed heartbeats: long enough for a busy database, short enough to reclaim in a minute.
STALE_AFTER_S = 30.0
BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 600.0
RELEASE_TIMEOUT_S = 5.0
SHUTDOWN_DEADLINE_S = 5.0
# DatabaseUnavailable: the pool could not connect (an outage must not end the loop).
_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
    DatabaseUnavailable,
)

Benchmark = Callable[[ModelJobRow], Coroutine[Any, Any, Profile]]


def retry_delay_s(attempts: int) -> float:
    """Backoff before the next attempt after `attempts` failed ones: 10 s, 20 s, 40 s, … 10 min."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class ModelBenchmark:
    """The job's work: resolve the model's files, check they are safe and fit, measure them."""

    def __init__(
        self,
        db: Pool,
        settings: BenchmarkerSettings,
        *,
        device: str = "cpu",
        measure_fn: Callable[[Target], Awaitable[Profile]] | None = None,
        zygote: Zygote | None = None,
        check_host_memory: bool = True,
    ) -> None:
        self._db = db
        self._settings = settings
        self._device = device
        # `zygote`: the process runtime's fork server, so the measuring agent is a process of
        # the kind the model's instances will be (None: a fresh interpreter, as other runtimes).
        self._measure = measure_fn or functools.partial(
            measure, command=settings.agent_command, zygote=zygote
        )
        # False where the measurement runs elsewhere (a Ray task checks the node it runs on).
        self._check_host_memory = check_host_memory

    async def __call__(self, job: ModelJobRow) -> Profile:
        target = await resolve(self._db, self._settings, job.model, self._device)
        if not self._check_host_memory:
            return await self._measure(target)
        weights = await asyncio.to_thread(_weights_bytes, target.model_dir)
        available = psutil.virtual_memory().available
        if minimum_bytes(weights) > available:
            raise OutOfMemory(
                f"Out of memory: {job.model} needs more than {weights / 1e9:.1f} GB, "
                f"{available / 1e9:.1f} GB available"
            )
        return await self._measure(target)


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


class Worker:
    """Claims and runs model jobs one at a time until told to stop."""

    def __init__(
        self,
        db: Pool,
        benchmark: Benchmark,
        *,
        worker_id: str | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        self.db = db
        self.benchmark = benchmark
        self.worker_id = worker_id or new_worker_id()
        self.poll_interval_s = poll_interval_s
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process jobs until `stop` is set (the current job is finished first)."""
        claim_failing = False
        async with self._listening():
            while not stop.is_set():
                try:
                    job = await self.claim()
                except _DB_ERRORS as exc:
                    if not claim_failing:  # once per outage, not once per poll
                        logger.warning("claiming model jobs fails: %s", type(exc).__name__)
                    claim_failing, job = True, None
                else:
                    if claim_failing:
                        logger.info("claiming model jobs works again")
                    claim_failing = False
                if job is None:
                    await self._idle(stop)
                    continue
                try:
                    await self.process(job)
                except Exception:
                    # One job must not end the loop. The job stays claimed without heartbeats
                    # and is reclaimed once stale (its attempts bounded by max_attempts).
                    logger.exception("recording job %d failed", job.id)
                    await self._idle(stop)

    async def run_once(self) -> ModelJobRow | None:
        """Claim one job and process it; the claimed job, or None when none was due."""
        job = await self.claim()
        if job is not None:
            await self.process(job)
        return job

    async def claim(self) -> ModelJobRow | None:
        return await queries.claim_model_job(
            self.db, self.worker_id, uuid.uuid4(), self.stale_after_s
        )

    async def process(self, job: ModelJobRow) -> None:
        """Run the benchmark for a claimed job, heartbeating, and record the outcome (fenced)."""
        if job.attempts > job.max_attempts:
            # Only a reclaimed job gets here: its workers keep dying (crash, OOM kill).
            await self._record_failure(
                job,
                LoadFailed(
                    f"Load error: gave up after {job.max_attempts} attempts "
                    "(the process measuring it stopped responding each time)"
                ),
            )
            return
        logger.info("benchmarking %s (job %d, attempt %d)", job.model, job.id, job.attempts)
        work = asyncio.create_task(self.benchmark(job), name=f"mlcp-benchmark-job-{job.id}")
        beat = asyncio.create_task(self._heartbeat(job), name=f"mlcp-heartbeat-job-{job.id}")
        try:
            await asyncio.wait({work, beat}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel(work, beat)
            with contextlib.suppress(*_DB_ERRORS):
                await asyncio.wait_for(self._release(job), RELEASE_TIMEOUT_S)
            raise
        if not work.done():
            # The heartbeat found the lease gone: another worker owns the job now.
            await _cancel(work)
            logger.warning(
                "lost the lease on job %d (%s); dropped the measurement", job.id, job.model
            )
            return
        await _cancel(beat)
        try:
            profile = work.result()
        except BenchmarkError as exc:
            await self._record_failure(job, exc)
        except Exception:
            logger.exception("benchmarking %s failed unexpectedly", job.model)
            await self._record_failure(job, LoadFailed("Load error: unexpected failure"))
        else:
            await self._record_success(job, profile)

    async def _heartbeat(self, job: ModelJobRow) -> None:
        """Return once the lease is lost; database hiccups are retried until the work ends."""
        assert job.lease_token is not None
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                if not await queries.heartbeat_model_job(self.db, job.id, job.lease_token):
                    return
            except _DB_ERRORS as exc:
                logger.warning("heartbeat of job %d failed: %s", job.id, type(exc).__name__)

    async def _record_success(self, job: ModelJobRow, profile: Profile) -> None:
        assert job.lease_token is not None
        ram = required_ram_bytes(profile)
        async with self.db.acquire() as conn, conn.transaction():
            done = await queries.finish_model_job(conn, job.id, job.lease_token, "available")
            if done is None:
                logger.warning("refused the late result of job %d (%s)", job.id, job.model)
                return
            gpu = profile.phases[0].peak_gpu_bytes
            await queries.upsert_model_profile(
                conn,
                job.model,
                profile.device_kind,
                ram,
                gpu,
                profile.load_s,
                phases_json(profile),
                job.id,
            )
            await queries.set_model_measured(conn, job.model, ram)
        logger.info("%s needs %.3f GB (job %d)", job.model, ram / 1e9, job.id)

    async def _record_failure(self, job: ModelJobRow, exc: BenchmarkError) -> None:
        assert job.lease_token is not None
        if exc.retryable and job.attempts < job.max_attempts:
            delay = retry_delay_s(job.attempts)
            row = await queries.retry_model_job(
                self.db, job.id, job.lease_token, exc.code, exc.message, delay
            )
            logger.warning(
                "job %d (%s) will retry in %.0f s: %s", job.id, job.model, delay, exc.message
            )
        else:
            row = await queries.finish_model_job(
                self.db, job.id, job.lease_token, "failed", exc.code, exc.message
            )
            logger.warning("job %d (%s) failed: %s", job.id, job.model, exc.message)
        if row is None:
            logger.warning("refused the late result of job %d (%s)", job.id, job.model)

    async def _release(self, job: ModelJobRow) -> None:
        assert job.lease_token is not None
        if await queries.release_model_job(self.db, job.id, job.lease_token):
            logger.info("handed job %d (%s) back to the queue", job.id, job.model)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Wait for a notification, the poll interval, or `stop`, whichever comes first."""
        waits = [
            asyncio.create_task(stop.wait(), name="mlcp-worker-stop"),
            asyncio.create_task(self._wake.wait(), name="mlcp-worker-wake"),
        ]
        try:
            await asyncio.wait(
                waits, timeout=self.poll_interval_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            await _cancel(*waits)
            self._wake.clear()

    @contextlib.asynccontextmanager
    async def _listening(self) -> AsyncIterator[None]:
        """LISTEN for new jobs on one pooled connection; polling covers any gap."""
        conn: asyncpg.Connection | None = None
        try:
            conn = await self.db.acquire()
            await conn.add_listener(CHANNEL, self._on_notify)
        except _DB_ERRORS as exc:
            logger.warning("not listening for new jobs (%s); polling", type(exc).__name__)
        try:
            yield
        finally:
            if conn is not None:
                with contextlib.suppress(*_DB_ERRORS):
                    await conn.remove_listener(CHANNEL, self._on_notify)
                with contextlib.suppress(*_DB_ERRORS):
                    await self.db.release(conn)

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()


async def _cancel(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def background_worker(
    db: Pool,
    settings: BenchmarkerSettings,
    *,
    name: str = "mlcp-benchmark-worker",
    device: str = "cpu",
    zygote: Zygote | None = None,
    remote_measure: Callable[[Target], Awaitable[Profile]] | None = None,
) -> AsyncIterator[Worker]:
    """Run a worker as a named task for the lifetime of the block (the control plane's lifespan).

    `remote_measure` measures elsewhere instead of in a local child (a Ray task on a node of
    the device kind, benchmarker/ray_measure.py). On exit the worker is told to stop, given
    SHUTDOWN_DEADLINE_S to finish, then cancelled, which stops its measuring child (or task)
    and hands the job back to the queue.
    """
    stop = asyncio.Event()
    benchmark = ModelBenchmark(
        db,
        settings,
        device=device,
        measure_fn=remote_measure,
        zygote=zygote,
        check_host_memory=remote_measure is None,
    )
    worker = Worker(db, benchmark)
    task = asyncio.create_task(worker.run(stop), name=name)
    try:
        yield worker
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), SHUTDOWN_DEADLINE_S)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception:
            logger.exception("the benchmark worker failed")
