"""The async-request queue on a real database: batched claims, leases, reclaim and fairness,
the grouped statements, and the control plane's queue loop (async_queue.QueueWorker)."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from control_plane import async_queue
from control_plane.async_queue import GroupCommit, QueueWorker
from db import async_queries as aq
from db.pool import create_pool
from db.rows import AsyncRequestRow


async def _key(db: asyncpg.Pool, name: str) -> int:
    return int(
        await db.fetchval(
            "INSERT INTO api_keys (name, prefix, key_hash, scope) VALUES ($1, $1, $2, 'user') "
            "RETURNING id",
            name,
            uuid.uuid4().bytes,
        )
    )


def _new(key: int, i: int = 0, max_live: int = 1000) -> aq.NewAsyncRequest:
    return aq.NewAsyncRequest(uuid.uuid4(), key, "m/x", {"prompt": str(i)}, max_live)


async def _submit(db: asyncpg.Pool, key: int, n: int = 1, max_live: int = 1000) -> list[uuid.UUID]:
    """n requests of one key, stored one statement each (in order)."""
    ids = []
    for i in range(n):
        (row,) = await aq.insert_async_requests(db, [_new(key, i, max_live)])
        assert row is not None and row.state == "accepted"
        ids.append(row.id)
    return ids


async def _claim_one(db: asyncpg.Pool, worker: str = "w") -> AsyncRequestRow:
    (row,) = await aq.claim_async_requests(db, worker, 1)
    return row


def _held(row: AsyncRequestRow) -> tuple[uuid.UUID, uuid.UUID]:
    assert row.lease_token is not None
    return row.id, row.lease_token


async def _state(db: asyncpg.Pool, rid: uuid.UUID) -> str:
    return str(await db.fetchval("SELECT state FROM async_requests WHERE id = $1", rid))


async def _expire(db: asyncpg.Pool, ids: list[uuid.UUID]) -> None:
    await db.execute(
        "UPDATE async_requests SET heartbeat_at = now() - interval '1 hour' WHERE id = ANY($1)",
        ids,
    )


async def test_one_keys_backlog_does_not_starve_another_key(db: asyncpg.Pool) -> None:
    busy, quiet = await _key(db, "busy"), await _key(db, "quiet")
    backlog = await _submit(db, busy, 50)
    (theirs,) = await _submit(db, quiet)
    claimed = [await _claim_one(db) for _ in range(3)]
    # Ranks: busy's requests 0..49, quiet's 0; ties go to the oldest.
    assert [c.id for c in claimed] == [backlog[0], theirs, backlog[1]]


async def test_a_batched_claim_keeps_the_fair_order(db: asyncpg.Pool) -> None:
    busy, quiet, late = await _key(db, "busy"), await _key(db, "quiet"), await _key(db, "late")
    stored = await aq.insert_async_requests(db, [_new(busy, i) for i in range(1000)])
    backlog = [r.id for r in stored if r is not None]
    (theirs,) = await _submit(db, quiet)
    first = await aq.claim_async_requests(db, "w", 4)
    assert [c.id for c in first] == [backlog[0], theirs, backlog[1], backlog[2]]
    assert all(c.state == "pending" and c.lease_token is not None for c in first)
    assert len({c.lease_token for c in first}) == 4, "each claimed request has its own lease"
    # A key arriving after 1,000 others are queued still goes in the very next batch.
    (newcomer,) = await _submit(db, late)
    second = await aq.claim_async_requests(db, "w", 8)
    assert second[0].id == newcomer
    assert [c.id for c in second[1:]] == backlog[3:10]


async def test_racing_batched_claims_of_two_pools_never_share_a_request(
    db: asyncpg.Pool, db_dsn: str
) -> None:
    keys = [await _key(db, f"k{i}") for i in range(10)]
    stored = await aq.insert_async_requests(db, [_new(keys[i % 10], i) for i in range(600)])
    assert all(r is not None for r in stored)
    pools = [await create_pool(db_dsn, max_size=4) for _ in range(2)]
    try:

        async def drain(pool: asyncpg.Pool, worker: str) -> list[uuid.UUID]:
            got: list[uuid.UUID] = []
            while True:
                batch = await aq.claim_async_requests(pool, worker, 7)
                if not batch:
                    return got
                got.extend(r.id for r in batch)

        runs = await asyncio.gather(
            *(drain(pool, f"w{n}-{i}") for n, pool in enumerate(pools) for i in range(4))
        )
    finally:
        for pool in pools:
            await pool.close()
    claimed = [rid for run in runs for rid in run]
    assert len(claimed) == 600 and len(set(claimed)) == 600
    assert sum(1 for run in runs if run) > 1, "the claims did not race"
    holders = await db.fetchval("SELECT count(DISTINCT worker_id) FROM async_requests")
    assert holders > 1


async def test_a_burst_is_stored_in_order_within_its_keys_bound(db: asyncpg.Pool) -> None:
    a, b = await _key(db, "a"), await _key(db, "b")
    await _submit(db, a, 2, max_live=5)
    burst = [_new(a, i, 5) for i in range(4)] + [_new(b, i, 5) for i in range(2)]
    rows = await aq.insert_async_requests(db, burst)
    # a had 2 live: 3 more fit, the 4th is over the bound; b's two fit.
    assert [r is not None for r in rows] == [True, True, True, False, True, True]
    ranks = await db.fetch("SELECT key_id, key_rank FROM async_requests ORDER BY key_id, key_rank")
    assert [(r["key_id"], r["key_rank"]) for r in ranks] == [
        (a, 0), (a, 1), (a, 2), (a, 3), (a, 4), (b, 0), (b, 1)
    ]  # fmt: skip
    # Finished requests no longer count: a finished one frees a place.
    row = await _claim_one(db)
    assert await aq.finish_async_requests(db, [aq.Outcome(row.id, _held(row)[1], "success")])
    (again,) = await aq.insert_async_requests(db, [_new(a, 9, 5)])
    assert again is not None


async def test_group_commit_sends_a_burst_in_few_statements(db: asyncpg.Pool) -> None:
    key = await _key(db, "k")
    sizes: list[int] = []

    async def insert(burst: list[aq.NewAsyncRequest]) -> list[AsyncRequestRow | None]:
        sizes.append(len(burst))
        return await aq.insert_async_requests(db, burst)

    store = GroupCommit(insert)
    rows = await asyncio.gather(*(store(_new(key, i, 150)) for i in range(200)))
    assert sum(r is not None for r in rows) == 150 and sum(sizes) == 200
    assert len(sizes) < 20, sizes  # the burst went together, not a statement each
    stored = await db.fetchval("SELECT count(*) FROM async_requests WHERE key_id = $1", key)
    assert stored == 150
    # An alone item is sent at once, not held back for company.
    sizes.clear()
    assert await asyncio.wait_for(store(_new(key, 0, 1000)), 2) is not None
    assert sizes == [1]


async def test_group_commit_fails_every_item_of_a_failed_statement(db: asyncpg.Pool) -> None:
    key = await _key(db, "k")
    store = GroupCommit(functools.partial(aq.insert_async_requests, db))
    same = uuid.uuid4()
    one = aq.NewAsyncRequest(same, key, "m/x", {}, 10)
    results = await asyncio.gather(store(one), store(one), store(one), return_exceptions=True)
    assert any(isinstance(r, asyncpg.UniqueViolationError) for r in results), results
    # It keeps working after a failed statement.
    assert await store(_new(key)) is not None


async def test_expired_leases_are_retried_once_then_failed_with_the_reason(
    db: asyncpg.Pool,
) -> None:
    key = await _key(db, "k")
    (rid,) = await _submit(db, key)
    row = await _claim_one(db, "dead")
    assert await aq.start_async_requests(db, [_held(row)]) == {rid}
    await _expire(db, [rid])
    assert await aq.reclaim_async_requests(db, 10) == [(rid, "pending")]
    got = await aq.get_async_request(db, rid, key)
    assert got is not None and got.reason and "retrying" in got.reason
    # The dead holder's late answer is fenced off.
    late = aq.Outcome(rid, _held(row)[1], "success", {"text": "late"})
    assert await aq.finish_async_requests(db, [late]) == set()

    second = await _claim_one(db, "dead-too")
    assert await aq.start_async_requests(db, [_held(second)]) == {rid}
    await _expire(db, [rid])
    assert await aq.reclaim_async_requests(db, 10) == [(rid, "failed")]
    got = await aq.get_async_request(db, rid, key)
    assert got is not None and got.state == "failed" and got.finished_at is not None
    assert got.reason == "the control plane processing it stopped, 2 attempts"
    assert await aq.claim_async_requests(db, "w", 5) == []


async def test_a_claimed_batch_whose_worker_died_is_requeued_after_its_lease(
    db: asyncpg.Pool,
) -> None:
    key = await _key(db, "k")
    ids = await _submit(db, key, 6)
    batch = await aq.claim_async_requests(db, "dead", 6)
    assert {r.id for r in batch} == set(ids)
    started = await aq.start_async_requests(db, [_held(r) for r in batch[:2]])
    assert started == set(ids[:2])
    # Within the lease nothing is taken from it.
    assert await aq.reclaim_async_requests(db, 10) == []
    assert await aq.claim_async_requests(db, "alive", 6) == []
    await _expire(db, ids)
    reclaimed = dict(await aq.reclaim_async_requests(db, 10))
    assert reclaimed == {rid: "pending" for rid in ids}
    again = await aq.claim_async_requests(db, "alive", 10)
    assert [r.id for r in again] == ids, "requeued in the fair order"
    assert await aq.start_async_requests(db, [_held(r) for r in again]) == set(ids)
    attempts = await db.fetch("SELECT id, attempts FROM async_requests")
    # The two that had started spent an attempt; the four that never did, none.
    assert {r["id"]: r["attempts"] for r in attempts} == {
        rid: 2 if rid in ids[:2] else 1 for rid in ids
    }
    done = await aq.finish_async_requests(
        db, [aq.Outcome(r.id, _held(r)[1], "success", {"text": str(r.id)}) for r in again]
    )
    assert done == set(ids)
    results = await db.fetch("SELECT id, state, result FROM async_requests")
    assert all(r["state"] == "success" and r["result"] == {"text": str(r["id"])} for r in results)


async def test_a_live_lease_is_not_reclaimed_and_cancel_fences_the_holder(
    db: asyncpg.Pool,
) -> None:
    key = await _key(db, "k")
    ids = await _submit(db, key, 2)
    batch = await aq.claim_async_requests(db, "w", 2)
    held = [_held(r) for r in batch]
    assert await aq.start_async_requests(db, held) == set(ids)
    assert await aq.reclaim_async_requests(db, 10) == []
    assert await aq.heartbeat_async_requests(db, held) == set(ids)
    cancelled = await aq.cancel_async_request(db, ids[0], key)
    assert cancelled is not None and cancelled.state == "cancelled"
    assert await aq.heartbeat_async_requests(db, held) == {ids[1]}
    outcomes = [aq.Outcome(rid, token, "success", {"text": "x"}) for rid, token in held]
    assert await aq.finish_async_requests(db, outcomes) == {ids[1]}
    assert await _state(db, ids[0]) == "cancelled"
    assert await aq.cancel_async_request(db, ids[0], key) is None
    # A stale token (another holder's) neither starts, renews nor finishes.
    (rid,) = await _submit(db, key)
    row = await _claim_one(db)
    stale = (rid, uuid.uuid4())
    assert await aq.start_async_requests(db, [stale]) == set()
    assert await aq.heartbeat_async_requests(db, [stale]) == set()
    assert await aq.finish_async_requests(db, [aq.Outcome(rid, stale[1], "failed")]) == set()
    assert await aq.start_async_requests(db, [_held(row)]) == {rid}


async def _run_worker(
    pool: asyncpg.Pool, handle: Callable[[QueueWorker, AsyncRequestRow], Awaitable[None]], **kw: int
) -> tuple[QueueWorker, asyncio.Event, asyncio.Task[None]]:
    def bound(row: AsyncRequestRow) -> Awaitable[None]:
        return handle(worker, row)

    worker = QueueWorker(pool, "w", kw.get("capacity", 8), kw.get("lease_s", 10), bound)
    stop = asyncio.Event()
    return worker, stop, asyncio.create_task(worker.run(stop))


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_two_queue_loops_run_every_request_once_in_batches(
    db: asyncpg.Pool, db_dsn: str
) -> None:
    keys = [await _key(db, f"k{i}") for i in range(5)]
    await aq.insert_async_requests(db, [_new(keys[i % 5], i) for i in range(300)])
    runs: list[uuid.UUID] = []

    async def noop(worker: QueueWorker, row: AsyncRequestRow) -> None:
        runs.append(row.id)
        assert await worker.start(row)
        assert await worker.finish(row, "success", {"text": worker.worker_id})

    pools = [await create_pool(db_dsn, max_size=4) for _ in range(2)]
    loops = [await _run_worker(pool, noop) for pool in pools]
    try:
        done = "SELECT count(*) = 300 FROM async_requests WHERE state = 'success'"
        await _until(lambda: db.fetchval(done), 30)
    finally:
        for _, stop, task in loops:
            stop.set()
            await task
        for pool in pools:
            await pool.close()
    assert len(runs) == 300 and len(set(runs)) == 300
    left = await db.fetchval("SELECT count(*) FROM async_requests WHERE lease_token IS NOT NULL")
    assert left == 0


async def test_the_queue_loop_aborts_a_cancelled_request_within_a_second(
    db: asyncpg.Pool,
) -> None:
    key = await _key(db, "k")
    (rid,) = await _submit(db, key)
    running, aborted = asyncio.Event(), asyncio.Event()

    async def slow(worker: QueueWorker, row: AsyncRequestRow) -> None:
        assert await worker.start(row)
        running.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            aborted.set()
            raise

    _, stop, task = await _run_worker(db, slow)
    try:
        await asyncio.wait_for(running.wait(), 10)
        assert await aq.cancel_async_request(db, rid, key) is not None
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(aborted.wait(), 2)
        assert asyncio.get_running_loop().time() - t0 < async_queue.HEARTBEAT_S * 2 + 0.2
    finally:
        stop.set()
        await task
    row = await aq.get_async_request(db, rid, key)
    assert row is not None and row.state == "cancelled" and row.attempts == 1


async def test_a_stopping_queue_loop_hands_its_requests_back(db: asyncpg.Pool) -> None:
    key = await _key(db, "k")
    ids = await _submit(db, key, 3)
    started: list[uuid.UUID] = []

    async def slow(worker: QueueWorker, row: AsyncRequestRow) -> None:
        assert await worker.start(row)
        started.append(row.id)
        await asyncio.sleep(60)

    _, stop, task = await _run_worker(db, slow, capacity=2)

    async def both_started() -> bool:
        return len(started) == 2

    await _until(both_started)
    # Capacity 2: the third waits unclaimed.
    assert await _state(db, ids[2]) == "accepted"
    stop.set()
    await asyncio.wait_for(task, 10)
    rows = await db.fetch("SELECT id, state, attempts, lease_token FROM async_requests")
    assert all(r["state"] in ("pending", "accepted") and r["lease_token"] is None for r in rows)
    assert all(r["attempts"] == 0 for r in rows), "handing back spends no attempt"
