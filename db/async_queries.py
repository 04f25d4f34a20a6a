"""Typed wrappers for the async-request blocks of queries.sql (kept apart: queries.py is full)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from db.queries import Executor, sql
from db.rows import AsyncRequestRow, UploadRow, WebhookDeliveryRow


def _row(r: Any) -> AsyncRequestRow | None:
    return AsyncRequestRow.of(r) if r else None


@dataclass(frozen=True)
class NewAsyncRequest:
    """One request of a burst to store (insert_async_requests)."""

    id: UUID
    key_id: int
    model: str
    input: dict[str, Any]
    max_live: int
    upload_id: UUID | None = None
    webhook: str | None = None
    webhook_events: list[str] | None = None


async def insert_async_requests(
    db: Executor, burst: Sequence[NewAsyncRequest]
) -> list[AsyncRequestRow | None]:
    """Store a burst in one statement; for each, its row, or None where its key was full."""
    if not burst:
        return []
    items = [
        {
            "seq": seq,
            "id": str(r.id),
            "key_id": r.key_id,
            "model": r.model,
            "input": r.input,
            "upload_id": str(r.upload_id) if r.upload_id is not None else None,
            "webhook": r.webhook,
            "webhook_events": r.webhook_events,
            "max_live": r.max_live,
        }
        for seq, r in enumerate(burst)
    ]
    stored = {
        row.id: row
        for row in map(AsyncRequestRow.of, await db.fetch(sql("insert_async_requests"), items))
    }
    return [stored.get(r.id) for r in burst]


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


async def claim_async_requests(db: Executor, worker_id: str, limit: int) -> list[AsyncRequestRow]:
    """Up to `limit` of the fairest due requests, each under a new lease, fairest first."""
    rows = await db.fetch(sql("claim_async_requests"), worker_id, limit)
    return [AsyncRequestRow.of(r) for r in rows]


async def reclaim_async_requests(db: Executor, lease_s: float) -> list[tuple[UUID, str]]:
    rows = await db.fetch(sql("reclaim_async_requests"), lease_s)
    return [(r["id"], r["state"]) for r in rows]


async def start_async_requests(db: Executor, held: Sequence[tuple[UUID, UUID]]) -> set[UUID]:
    """Of the (id, lease_token) pairs, the ids that went to 'processing'."""
    if not held:
        return set()
    return {r["id"] for r in await db.fetch(sql("start_async_requests"), *_columns(held))}


async def heartbeat_async_requests(db: Executor, held: Sequence[tuple[UUID, UUID]]) -> set[UUID]:
    """Of the (id, lease_token) pairs, the ids whose lease was renewed (still held)."""
    if not held:
        return set()
    return {r["id"] for r in await db.fetch(sql("heartbeat_async_requests"), *_columns(held))}


def _columns(held: Sequence[tuple[UUID, UUID]]) -> tuple[list[UUID], list[UUID]]:
    return [h[0] for h in held], [h[1] for h in held]


async def defer_async_request(
    db: Executor, request_id: UUID, token: UUID, reason: str, delay_s: float
) -> bool:
    row = await db.fetchval(sql("defer_async_request"), request_id, token, reason, delay_s)
    return row is not None


@dataclass(frozen=True)
class Outcome:
    """How one held request ends (finish_async_requests): success with its result, or failed
    with its reason."""

    id: UUID
    lease_token: UUID
    state: str
    result: dict[str, Any] | None = None
    reason: str | None = None


async def finish_async_requests(db: Executor, outcomes: Sequence[Outcome]) -> set[UUID]:
    """End held requests in one statement; the ids that ended (the others were cancelled or
    taken over)."""
    if not outcomes:
        return set()
    items = [
        {
            "id": str(o.id),
            "lease_token": str(o.lease_token),
            "state": o.state,
            "result": o.result,
            "reason": o.reason,
        }
        for o in outcomes
    ]
    return {r["id"] for r in await db.fetch(sql("finish_async_requests"), items)}


async def delete_finished_async_requests(db: Executor, cutoff: datetime) -> list[UUID]:
    return [r["id"] for r in await db.fetch(sql("delete_finished_async_requests"), cutoff)]


async def ensure_server_secret(db: Executor, name: str, candidate: bytes) -> bytes | None:
    value = await db.fetchval(sql("ensure_server_secret"), name, candidate)
    return bytes(value) if value is not None else None


async def insert_upload(
    db: Executor, upload_id: UUID, key_id: int, extension: str, expires_in_s: float
) -> UploadRow:
    row = await db.fetchrow(sql("insert_upload"), upload_id, key_id, extension, expires_in_s)
    return UploadRow.of(row)


async def get_upload(db: Executor, upload_id: UUID) -> UploadRow | None:
    row = await db.fetchrow(sql("get_upload"), upload_id)
    return UploadRow.of(row) if row else None


async def begin_upload_write(db: Executor, upload_id: UUID) -> UploadRow | None:
    row = await db.fetchrow(sql("begin_upload_write"), upload_id)
    return UploadRow.of(row) if row else None


async def complete_upload(db: Executor, upload_id: UUID, size_bytes: int) -> UploadRow | None:
    row = await db.fetchrow(sql("complete_upload"), upload_id, size_bytes)
    return UploadRow.of(row) if row else None


async def abandon_upload_write(db: Executor, upload_id: UUID) -> bool:
    return await db.fetchval(sql("abandon_upload_write"), upload_id) is not None


async def delete_stale_uploads(db: Executor, cutoff: datetime) -> list[tuple[UUID, str]]:
    rows = await db.fetch(sql("delete_stale_uploads"), cutoff)
    return [(r["id"], r["extension"]) for r in rows]


async def ensure_webhook_secret(db: Executor, key_id: int, candidate: str) -> str | None:
    value = await db.fetchval(sql("ensure_webhook_secret"), key_id, candidate)
    return str(value) if value is not None else None


async def claim_webhook_delivery(
    db: Executor, lease_s: float
) -> tuple[WebhookDeliveryRow, str | None] | None:
    row = await db.fetchrow(sql("claim_webhook_delivery"), lease_s)
    if row is None:
        return None
    return WebhookDeliveryRow.of(row), row["secret"]


async def record_webhook_attempt(
    db: Executor,
    delivery_id: UUID,
    state: str,
    last_status: int | None,
    last_error: str | None,
    retry_in_s: float,
) -> bool:
    value = await db.fetchval(
        sql("record_webhook_attempt"), delivery_id, state, last_status, last_error, retry_in_s
    )
    return value is not None


async def list_webhook_deliveries(
    db: Executor, request_id: UUID, key_id: int
) -> list[WebhookDeliveryRow]:
    rows = await db.fetch(sql("list_webhook_deliveries"), request_id, key_id)
    return [WebhookDeliveryRow.of(r) for r in rows]
