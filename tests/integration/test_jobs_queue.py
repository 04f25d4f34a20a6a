"""The model-job queue on a real PostgreSQL: claims, fencing, heartbeats, retries, hand-backs.

Workers run with a fake benchmark step (a coroutine with behaviour) so these tests exercise the
queue protocol; the real measurement is covered in test_jobs_api.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import pytest

from benchmarker import LoadFailed, UnsafeWeights
from benchmarker.estimate import Phase, Profile, required_ram_bytes
from benchmarker.worker import Worker
from db import queries
from db.rows import ModelJobRow

MB = 1_000_000
PROFILE = Profile("cpu", 0.5, 300 * MB, (Phase(1, 400 * MB, None, 8, 0.5),))


async def add_models(db: asyncpg.Pool, names: list[str]) -> None:
    for name in names:
        await queries.upsert_discovered_model(
            db, name, "text-generation", "dir", "/nowhere", None, 1000
        )


async def job_row(db: asyncpg.Pool, job_id: int) -> ModelJobRow:
    return ModelJobRow.of(await db.fetchrow("SELECT * FROM model_jobs WHERE id = $1", job_id))


async def make_stale(db: asyncpg.Pool, job_id: int) -> None:
    """Move the heartbeat back instead of sleeping past the stale limit."""
    await db.execute(
        "UPDATE model_jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = $1", job_id
    )


async def test_two_workers_claim_each_of_200_jobs_exactly_once(db: asyncpg.Pool) -> None:
    names = [f"race/m{i:03d}" for i in range(200)]
    await add_models(db, names)
    for name in names:
        assert await queries.enqueue_model_job(db, name) is not None
    claims: Counter[int] = Counter()
    by_worker: Counter[str] = Counter()

    def bench_for(worker_name: str):  # type: ignore[no-untyped-def]
        async def bench(job: ModelJobRow) -> Profile:
            claims[job.id] += 1
            by_worker[worker_name] += 1
            await asyncio.sleep(0)
            return PROFILE

        return bench

    stop = asyncio.Event()
    workers = [
        Worker(db, bench_for(name), worker_id=name, poll_interval_s=0.05) for name in ("a", "b")
    ]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        for _ in range(600):
            left = await db.fetchval("SELECT count(*) FROM model_jobs WHERE state <> 'available'")
            if left == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert len(claims) == 200 and set(claims.values()) == {1}
    assert by_worker["a"] > 0 and by_worker["b"] > 0
    measured = await db.fetchval(
        "SELECT count(*) FROM models WHERE required_ram_bytes = $1", required_ram_bytes(PROFILE)
    )
    assert measured == 200
    assert await db.fetchval("SELECT count(*) FROM model_profiles") == 200


async def test_one_live_job_per_model(db: asyncpg.Pool) -> None:
    first = await queries.enqueue_model_job(db, "org/one")
    assert first is not None
    assert await queries.enqueue_model_job(db, "org/one") is None
    results = await asyncio.gather(*(queries.enqueue_model_job(db, "org/two") for _ in range(20)))
    assert sum(r is not None for r in results) == 1


async def test_a_stale_job_is_reclaimed_and_the_late_result_refused(db: asyncpg.Pool) -> None:
    await add_models(db, ["org/m"])
    queued = await queries.enqueue_model_job(db, "org/m")
    assert queued is not None
    late = Worker(db, _returns(PROFILE), worker_id="late")
    fresh = Worker(db, _returns(PROFILE), worker_id="fresh")
    held = await late.claim()
    assert held is not None and held.id == queued.id
    assert await fresh.claim() is None  # heartbeat is fresh: not claimable

    await make_stale(db, held.id)
    taken = await fresh.claim()
    assert taken is not None and taken.id == held.id
    assert taken.attempts == 2 and taken.lease_token != held.lease_token

    # The first worker finishes late: nothing it reports is written.
    await late.process(held)
    row = await job_row(db, held.id)
    assert row.state == "benchmarking"
    assert (row.lease_token, row.worker_id) == (taken.lease_token, "fresh")
    assert await queries.get_model_profile(db, "org/m", "cpu") is None
    assert not await queries.heartbeat_model_job(db, held.id, held.lease_token)  # type: ignore[arg-type]

    await fresh.process(taken)
    assert (await job_row(db, held.id)).state == "available"
    assert (await queries.get_model(db, "org/m")).required_ram_bytes == required_ram_bytes(PROFILE)  # type: ignore[union-attr]


async def test_a_worker_that_loses_its_lease_stops_measuring(db: asyncpg.Pool) -> None:
    await add_models(db, ["org/m"])
    await queries.enqueue_model_job(db, "org/m")
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(job: ModelJobRow) -> Profile:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return PROFILE

    slow = Worker(db, forever, worker_id="slow", heartbeat_s=0.05)
    held = await slow.claim()
    assert held is not None
    processing = asyncio.create_task(slow.process(held))
    await asyncio.wait_for(started.wait(), 5)
    await make_stale(db, held.id)
    taken = await Worker(db, _returns(PROFILE), worker_id="other").claim()
    assert taken is not None
    await asyncio.wait_for(processing, 5)
    assert cancelled.is_set()
    assert (await job_row(db, held.id)).worker_id == "other"


async def test_load_errors_retry_with_backoff_then_fail(db: asyncpg.Pool) -> None:
    await add_models(db, ["org/m"])
    queued = await queries.enqueue_model_job(db, "org/m")
    assert queued is not None
    attempts = 0

    async def broken(job: ModelJobRow) -> Profile:
        nonlocal attempts
        attempts += 1
        raise LoadFailed("Load error: boom")

    worker = Worker(db, broken)
    for attempt in (1, 2):
        assert await worker.run_once() is not None
        row = await job_row(db, queued.id)
        assert (row.state, row.attempts, row.reason) == ("queued", attempt, "Load error: boom")
        backoff = await db.fetchval(
            "SELECT extract(epoch FROM run_after - modified_at) FROM model_jobs WHERE id = $1",
            queued.id,
        )
        assert float(backoff) == pytest.approx(10.0 * 2 ** (attempt - 1), abs=1)
        assert await worker.run_once() is None  # not due yet
        await db.execute("UPDATE model_jobs SET run_after = now() WHERE id = $1", queued.id)
    assert await worker.run_once() is not None
    row = await job_row(db, queued.id)
    assert (row.state, row.attempts, row.error_code) == ("failed", 3, "load_error")
    assert attempts == 3


async def test_permanent_failures_are_not_retried(db: asyncpg.Pool) -> None:
    queued = await queries.enqueue_model_job(db, "org/pickled")
    assert queued is not None

    async def unsafe(job: ModelJobRow) -> Profile:
        raise UnsafeWeights()

    await Worker(db, unsafe).run_once()
    row = await job_row(db, queued.id)
    assert (row.state, row.error_code, row.attempts) == ("failed", "unsafe_weights", 1)
    assert row.reason == "Unsafe weights format (pickle); only safetensors are loaded."
    assert row.finished_at is not None


async def test_a_job_whose_workers_keep_dying_gives_up(db: asyncpg.Pool) -> None:
    queued = await queries.enqueue_model_job(db, "org/m")
    assert queued is not None
    for _ in range(3):
        assert await Worker(db, _returns(PROFILE)).claim() is not None
        await make_stale(db, queued.id)
    await Worker(db, _returns(PROFILE)).run_once()
    row = await job_row(db, queued.id)
    assert (row.state, row.attempts) == ("failed", 4)
    assert row.reason is not None and "gave up after 3 attempts" in row.reason


async def test_cancelling_a_worker_hands_its_job_back(db: asyncpg.Pool) -> None:
    queued = await queries.enqueue_model_job(db, "org/m")
    assert queued is not None
    started = asyncio.Event()

    async def forever(job: ModelJobRow) -> Profile:
        started.set()
        await asyncio.sleep(3600)
        return PROFILE

    stop = asyncio.Event()
    task = asyncio.create_task(Worker(db, forever, poll_interval_s=0.05).run(stop))
    await asyncio.wait_for(started.wait(), 5)
    stop.set()  # the job is still running: the loop only stops between jobs
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = await job_row(db, queued.id)
    assert (row.state, row.attempts, row.lease_token) == ("queued", 0, None)


def _returns(profile: Profile):  # type: ignore[no-untyped-def]
    async def bench(job: ModelJobRow) -> Profile:
        return profile

    return bench


async def test_observed_memory_corrects_the_catalog_figure_upwards(db: asyncpg.Pool) -> None:
    await add_models(db, ["org/m"])
    await queries.enqueue_model_job(db, "org/m")
    await Worker(db, _returns(PROFILE)).run_once()
    figure = required_ram_bytes(PROFILE)

    await queries.record_model_observation(db, "org/m", "cpu", 1, figure - 1000, None)
    await queries.record_model_observation(db, "org/m", "cpu", 4, figure * 2, None)
    assert (await queries.get_model(db, "org/m")).required_ram_bytes == figure  # type: ignore[union-attr]

    await queries.record_model_observation(db, "org/m", "cpu", 1, figure + 5000, None)
    await queries.record_model_observation(db, "org/m", "cpu", 1, figure + 10, None)
    assert (await queries.get_model(db, "org/m")).required_ram_bytes == figure + 5000  # type: ignore[union-attr]
    peaks = await db.fetch(
        "SELECT concurrency, peak_rss_bytes FROM model_observations ORDER BY concurrency"
    )
    assert [(r["concurrency"], r["peak_rss_bytes"]) for r in peaks] == [
        (1, figure + 5000),
        (4, figure * 2),
    ]
