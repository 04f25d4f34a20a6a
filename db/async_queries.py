"""Typed wrappers for the async-request blocks of queries.sql (kept apart: queries.py is full)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from db.queries import Executor, sql
from db.rows import AsyncRequestRow


def _row(r: Any) -> AsyncRequestRow | None:
    return AsyncRequestRow.of(r) if r else None


async def insert_async_request(
    db: Executor, request_id: UUID, key_id: int, model: str, data: dict[str, Any], max_live: int
) -> AsyncRequestRow | None:
    row = await db.fetchrow(sql("insert_async_request"), request_id, key_id, model, data, max_live)
    return _row(row)


async def get_async_request(db: Executor, request_id: UUID, key_id: int) -> AsyncRequestRow | None:
    return _row(await db.fetchrow(sql("get_async_request"), request_id, key_id))


async def list_async_requests(
    db: Executor, key_id: int, after: UUID | None, limit: int
) -> list[AsyncRequestRow]:
    rows = await db.fetch(sql("list_async_requests"), key_id, after, limit)
    return [AsyncRequestRow.of(r) for r in rows]


async def cancel_async_request(
    db: Executor, request_id: UUID, key_id: int
) -> AsyncRequestRow | None:
    return _row(await db.fetchrow(sql("cancel_async_request"), request_id, key_id))


async def claim_async_request(db: Executor, worker_id: str, token: UUID) -> AsyncRequestRow | None:
    return _row(await db.fetchrow(sql("claim_async_request"), worker_id, token))


async def reclaim_async_requests(db: Executor, lease_s: float) -> list[tuple[UUID, str]]:
    rows = await db.fetch(sql("reclaim_async_requests"), lease_s)
    return [(r["id"], r["state"]) for r in rows]


async def start_async_request(
    db: Executor, request_id: UUID, token: UUID
) -> AsyncRequestRow | None:
    return _row(await db.fetchrow(sql("start_async_request"), request_id, token))


async def heartbeat_async_request(db: Executor, request_id: UUID, token: UUID) -> bool:
    return await db.fetchval(sql("heartbeat_async_request"), request_id, token) is not None


async def defer_async_request(
    db: Executor, request_id: UUID, token: UUID, reason: str, delay_s: float
) -> bool:
    row = await db.fetchval(sql("defer_async_request"), request_id, token, reason, delay_s)
    return row is not None


async def finish_async_request(
    db: Executor,
    request_id: UUID,
    token: UUID,
    state: str,
    result: dict[str, Any] | None,
    reason: str | None,
) -> bool:
    row = await db.fetchval(sql("finish_async_request"), request_id, token, state, result, reason)
    return row is not None


async def delete_finished_async_requests(db: Executor, cutoff: datetime) -> list[UUID]:
    return [r["id"] for r in await db.fetch(sql("delete_finished_async_requests"), cutoff)]
