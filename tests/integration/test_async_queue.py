"""The async-request queue on a real database: claims, leases, reclaim and fairness."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from db import async_queries as aq


async def _key(db: asyncpg.Pool, name: str) -> int:
    return int(
        await db.fetchval(
            "INSERT INTO api_keys (name, prefix, key_hash, scope) VALUES ($1, $1, $2, 'user') "
            "RETURNING id",
            name,
            uuid.uuid4().bytes,
        )
    )


async def _submit(db: asyncpg.Pool, key: int, n: int = 1, max_live: int = 1000) -> list[uuid.UUID]:
    ids = []
    for i in range(n):
        row = await aq.insert_async_request(
            db, uuid.uuid4(), key, "m/x", {"prompt": str(i)}, max_live
        )
        assert row is not None and row.state == "accepted"
        ids.append(row.id)
    return ids


async def test_one_keys_backlog_does_not_starve_another_key(db: asyncpg.Pool) -> None:
    busy, quiet = await _key(db, "busy"), await _key(db, "quiet")
    backlog = await _submit(db, busy, 50)
    (theirs,) = await _submit(db, quiet)
    claimed = [await aq.claim_async_request(db, "w", uuid.uuid4()) for _ in range(3)]
    order = [c.id for c in claimed if c is not None]
    # Ranks: busy's requests 0..49, quiet's 0; ties go to the oldest.
    assert order == [backlog[0], theirs, backlog[1]]


async def test_a_key_is_bounded_and_concurrent_claims_never_share_a_request(
    db: asyncpg.Pool,
) -> None:
    key = await _key(db, "k")
    await _submit(db, key, 5, max_live=5)
    assert await aq.insert_async_request(db, uuid.uuid4(), key, "m/x", {}, 5) is None
    got = await asyncio.gather(*(aq.claim_async_request(db, "w", uuid.uuid4()) for _ in range(8)))
    ids = [g.id for g in got if g is not None]
    assert len(ids) == 5 and len(set(ids)) == 5


async def test_expired_leases_are_retried_once_then_failed_with_the_reason(
    db: asyncpg.Pool,
) -> None:
    key = await _key(db, "k")
    (rid,) = await _submit(db, key)
    token = uuid.uuid4()
    assert await aq.claim_async_request(db, "dead", token) is not None
    assert await aq.start_async_request(db, rid, token) is not None
    await db.execute(
        "UPDATE async_requests SET heartbeat_at = now() - interval '1 hour' WHERE id = $1", rid
    )
    assert await aq.reclaim_async_requests(db, 10) == [(rid, "pending")]
    row = await aq.get_async_request(db, rid, key)
    assert row is not None and row.reason and "retrying" in row.reason
    # The dead holder's late answer is fenced off.
    assert not await aq.finish_async_request(db, rid, token, "success", {"text": "late"}, None)

    second = uuid.uuid4()
    assert await aq.claim_async_request(db, "dead-too", second) is not None
    assert await aq.start_async_request(db, rid, second) is not None
    await db.execute(
        "UPDATE async_requests SET heartbeat_at = now() - interval '1 hour' WHERE id = $1", rid
    )
    assert await aq.reclaim_async_requests(db, 10) == [(rid, "failed")]
    row = await aq.get_async_request(db, rid, key)
    assert row is not None and row.state == "failed" and row.finished_at is not None
    assert row.reason == "the control plane processing it stopped, 2 attempts"
    assert await aq.claim_async_request(db, "w", uuid.uuid4()) is None


async def test_a_live_lease_is_not_reclaimed_and_cancel_fences_the_holder(
    db: asyncpg.Pool,
) -> None:
    key = await _key(db, "k")
    (rid,) = await _submit(db, key)
    token = uuid.uuid4()
    await aq.claim_async_request(db, "w", token)
    await aq.start_async_request(db, rid, token)
    assert await aq.reclaim_async_requests(db, 10) == []
    assert await aq.heartbeat_async_request(db, rid, token)
    cancelled = await aq.cancel_async_request(db, rid, key)
    assert cancelled is not None and cancelled.state == "cancelled"
    assert not await aq.heartbeat_async_request(db, rid, token)
    assert not await aq.finish_async_request(db, rid, token, "success", {"text": "x"}, None)
    assert await aq.cancel_async_request(db, rid, key) is None
