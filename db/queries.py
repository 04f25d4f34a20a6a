"""Typed wrappers, one per named block of queries.sql."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime
from functools import cache
from importlib import resources
from typing import Any, Protocol
from uuid import UUID

from db.rows import (
    AuthKeyRow,
    InstanceEventRow,
    InstanceRow,
    KeyLimits,
    KeyRow,
    LifecycleEventRow,
    ModelJobRow,
    ModelProfileRow,
    ModelRow,
    PendingLoadRow,
    ReservationRow,
    UsageRow,
)

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


class Executor(Protocol):
    """What both asyncpg.Pool and asyncpg.Connection offer."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of `-- name: x` blocks into {name: sql}."""
    parts = _BLOCK.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


@cache
def _all_queries() -> dict[str, str]:
    return parse_queries(resources.files("db").joinpath("queries.sql").read_text("utf-8"))


def sql(name: str) -> str:
    """The SQL text of one named block (the file is read and split once)."""
    return _all_queries()[name]


# -- keys ---------------------------------------------------------------------------------------


async def insert_key(db: Executor, name: str, prefix: str, key_hash: bytes, scope: str) -> KeyRow:
    return KeyRow.of(await db.fetchrow(sql("insert_key"), name, prefix, key_hash, scope))


async def get_active_key_by_hash(db: Executor, key_hash: bytes) -> AuthKeyRow | None:
    row = await db.fetchrow(sql("get_active_key_by_hash"), key_hash)
    return AuthKeyRow.of(row) if row else None


async def list_keys(db: Executor) -> list[KeyRow]:
    return [KeyRow.of(r) for r in await db.fetch(sql("list_keys"))]


async def count_active_admin_keys(db: Executor) -> int:
    return int(await db.fetchval(sql("count_active_admin_keys")))


async def lock_admin_keys(db: Executor) -> None:
    await db.execute(sql("lock_admin_keys"))


async def revoke_key(db: Executor, key_id: int) -> KeyRow | None:
    row = await db.fetchrow(sql("revoke_key"), key_id)
    return KeyRow.of(row) if row else None


async def set_key_state(
    db: Executor,
    key_id: int,
    disabled: bool | None,
    change_expiry: bool,
    expires_at: datetime | None,
) -> KeyRow | None:
    row = await db.fetchrow(sql("set_key_state"), key_id, disabled, change_expiry, expires_at)
    return KeyRow.of(row) if row else None


async def other_usable_admin_keys(db: Executor, key_id: int) -> int:
    return int(await db.fetchval(sql("other_usable_admin_keys"), key_id))


async def get_active_key(db: Executor, key_id: int) -> KeyRow | None:
    row = await db.fetchrow(sql("get_active_key"), key_id)
    return KeyRow.of(row) if row else None


async def restore_admin_key(db: Executor, key_hash: bytes) -> KeyRow | None:
    row = await db.fetchrow(sql("restore_admin_key"), key_hash)
    return KeyRow.of(row) if row else None


# Limit fields of KeyLimits, as the columns of api_keys are named.
LIMIT_COLUMNS = tuple(KeyLimits.__dataclass_fields__)


async def set_key_limits(
    db: Executor, key_id: int, changes: dict[str, int | None]
) -> KeyRow | None:
    """Set the limits in `changes` (column name: value, None for the default); others stay."""
    assert set(changes) <= set(LIMIT_COLUMNS), changes
    row = await db.fetchrow(sql("set_key_limits"), key_id, changes)
    return KeyRow.of(row) if row else None


# -- calls per key per month --------------------------------------------------------------------


async def reserve_calls(
    db: Executor, key_id: int, month: date, wanted: int, monthly_limit: int
) -> tuple[int, int]:
    """(granted, calls used or held now); granted 0 when the month's quota is all taken."""
    row = await db.fetchrow(sql("reserve_calls"), key_id, month, wanted, monthly_limit)
    if row is None:
        return 0, monthly_limit
    return int(row["last_grant"]), int(row["used"])


async def record_calls(db: Executor, key_id: int, month: date, calls: int, released: int) -> None:
    await db.execute(sql("record_calls"), key_id, month, calls, released)


async def usage_for_month(db: Executor, month: date, key_id: int | None) -> list[UsageRow]:
    return [UsageRow.of(r) for r in await db.fetch(sql("usage_for_month"), month, key_id)]


async def count_owned_instances(db: Executor, owner_key_id: int, model: str) -> int:
    return int(await db.fetchval(sql("count_owned_instances"), owner_key_id, model))


async def count_owned_apis(db: Executor, owner: str, name: str) -> int:
    return int(await db.fetchval(sql("count_owned_apis"), owner, name))


# -- models -------------------------------------------------------------------------------------


async def upsert_discovered_model(
    db: Executor,
    name: str,
    task: str,
    source_kind: str,
    source_path: str | None,
    gguf_file: str | None,
    param_bytes: int | None,
) -> None:
    await db.execute(
        sql("upsert_discovered_model"),
        name,
        task,
        source_kind,
        source_path,
        gguf_file,
        param_bytes,
    )


async def mark_models_absent_except(db: Executor, names: Sequence[str]) -> None:
    await db.execute(sql("mark_models_absent_except"), list(names))


async def list_models(db: Executor) -> list[ModelRow]:
    return [ModelRow.of(r) for r in await db.fetch(sql("list_models"))]


async def get_model(db: Executor, name: str) -> ModelRow | None:
    row = await db.fetchrow(sql("get_model"), name)
    return ModelRow.of(row) if row else None


# -- instances ----------------------------------------------------------------------------------


def _instance(row: Any) -> InstanceRow | None:
    return InstanceRow.of(row) if row else None


async def update_live_instance_settings(
    db: Executor, model: str, concurrency: int, expiration_s: int
) -> InstanceRow | None:
    return _instance(
        await db.fetchrow(sql("update_live_instance_settings"), model, concurrency, expiration_s)
    )


async def transition_instance(
    db: Executor, instance_id: int, to: str, reason: str, allowed_from: Sequence[str]
) -> InstanceRow | None:
    """Move an instance to `to` if it is in one of `allowed_from`; None when it was not."""
    return _instance(
        await db.fetchrow(sql("transition_instance"), instance_id, to, reason, list(allowed_from))
    )


async def mark_running(
    db: Executor, instance_id: int, endpoint: str, handle: str
) -> InstanceRow | None:
    return _instance(await db.fetchrow(sql("mark_running"), instance_id, endpoint, handle))


async def set_instance_handle(
    db: Executor, instance_id: int, handle: str, endpoint: str | None
) -> InstanceRow | None:
    return _instance(await db.fetchrow(sql("set_instance_handle"), instance_id, handle, endpoint))


async def get_instance(db: Executor, instance_id: int) -> InstanceRow | None:
    return _instance(await db.fetchrow(sql("get_instance"), instance_id))


async def latest_instance_for_model(db: Executor, model: str) -> InstanceRow | None:
    return _instance(await db.fetchrow(sql("latest_instance_for_model"), model))


async def renew_launches(db: Executor, instance_ids: list[int]) -> None:
    await db.execute(sql("renew_launches"), instance_ids)


async def live_instances(db: Executor) -> list[InstanceRow]:
    return [InstanceRow.of(r) for r in await db.fetch(sql("live_instances"))]


async def live_instances_for_model(db: Executor, model: str) -> list[InstanceRow]:
    return [InstanceRow.of(r) for r in await db.fetch(sql("live_instances_for_model"), model)]


async def instance_events(db: Executor, instance_id: int) -> list[InstanceEventRow]:
    return [InstanceEventRow.of(r) for r in await db.fetch(sql("instance_events"), instance_id)]


async def record_activity(
    db: Executor,
    instance_id: int,
    new_inferences: int,
    ended_s_ago: float | None,
    in_flight: int,
    node_id: str,
    new_rejected: int = 0,
) -> None:
    await db.execute(
        sql("record_activity"),
        instance_id,
        new_inferences,
        ended_s_ago,
        in_flight,
        node_id,
        new_rejected,
    )


async def claim_expired_instances(
    db: Executor, now: datetime, stale_after_s: float
) -> list[InstanceRow]:
    return [
        InstanceRow.of(r)
        for r in await db.fetch(sql("claim_expired_instances"), now, stale_after_s)
    ]


async def record_observed_memory(db: Executor, instance_id: int, mem_bytes: int) -> None:
    await db.execute(sql("record_observed_memory"), instance_id, mem_bytes)


# -- jobs and profiles --------------------------------------------------------------------------


def _job(row: Any) -> ModelJobRow | None:
    return ModelJobRow.of(row) if row else None


async def enqueue_model_job(db: Executor, model: str) -> ModelJobRow | None:
    """Queue a job for `model`; None when a live job already exists."""
    return _job(await db.fetchrow(sql("enqueue_model_job"), model))


async def insert_failed_model_job(
    db: Executor, model: str, error_code: str, reason: str
) -> ModelJobRow:
    return ModelJobRow.of(
        await db.fetchrow(sql("insert_failed_model_job"), model, error_code, reason)
    )


async def latest_model_job(db: Executor, model: str, states: Sequence[str]) -> ModelJobRow | None:
    return _job(await db.fetchrow(sql("latest_model_job"), model, list(states)))


async def claim_model_job(
    db: Executor, worker_id: str, token: UUID, stale_after_s: float
) -> ModelJobRow | None:
    return _job(await db.fetchrow(sql("claim_model_job"), worker_id, token, stale_after_s))


async def heartbeat_model_job(db: Executor, job_id: int, token: UUID) -> bool:
    return await db.fetchval(sql("heartbeat_model_job"), job_id, token) is not None


async def finish_model_job(
    db: Executor,
    job_id: int,
    token: UUID,
    state: str,
    error_code: str | None = None,
    reason: str | None = None,
) -> ModelJobRow | None:
    """Finish a job held under `token`; None when the lease was lost (the result is refused)."""
    return _job(
        await db.fetchrow(sql("finish_model_job"), job_id, token, state, error_code, reason)
    )


async def retry_model_job(
    db: Executor, job_id: int, token: UUID, error_code: str, reason: str, delay_s: float
) -> ModelJobRow | None:
    return _job(
        await db.fetchrow(sql("retry_model_job"), job_id, token, error_code, reason, delay_s)
    )


async def release_model_job(db: Executor, job_id: int, token: UUID) -> bool:
    return await db.fetchval(sql("release_model_job"), job_id, token) is not None


async def upsert_model_profile(
    db: Executor,
    model: str,
    device_kind: str,
    required_ram_bytes: int,
    peak_gpu_bytes: int | None,
    load_s: float,
    phases: list[dict[str, Any]],
    job_id: int | None,
) -> None:
    await db.execute(
        sql("upsert_model_profile"),
        model,
        device_kind,
        required_ram_bytes,
        peak_gpu_bytes,
        load_s,
        phases,
        job_id,
    )


async def set_model_measured(db: Executor, model: str, required_ram_bytes: int) -> None:
    await db.execute(sql("set_model_measured"), model, required_ram_bytes)


async def get_model_profile(db: Executor, model: str, device_kind: str) -> ModelProfileRow | None:
    row = await db.fetchrow(sql("get_model_profile"), model, device_kind)
    return ModelProfileRow.of(row) if row else None


async def observed_peaks(
    db: Executor, model: str, device_kind: str, concurrency: int
) -> tuple[int | None, int | None]:
    """(host RSS, VRAM) peaks running instances reached at `concurrency` or below."""
    row = await db.fetchrow(sql("observed_peaks"), model, device_kind, concurrency)
    if row is None:
        return None, None
    return row["rss_bytes"], row["gpu_bytes"]


async def record_model_observation(
    db: Executor,
    model: str,
    device_kind: str,
    concurrency: int,
    peak_rss_bytes: int,
    peak_gpu_bytes: int | None,
) -> None:
    """Note the memory a running instance reached (called from the instance health poll)."""
    await db.execute(
        sql("record_model_observation"),
        model,
        device_kind,
        concurrency,
        peak_rss_bytes,
        peak_gpu_bytes,
    )


async def lock_model_requests(db: Executor, model: str) -> None:
    await db.execute(sql("lock_model_requests"), model)


async def cluster_id(db: Executor) -> str:
    """This deployment's identity (labels its instances)."""
    return str(await db.fetchval(sql("cluster_id")))


# -- admission ----------------------------------------------------------------------------------


async def lock_admission(db: Executor) -> None:
    await db.execute(sql("lock_admission"))


async def reservations(db: Executor, stale_after_s: float) -> list[ReservationRow]:
    return [ReservationRow.of(r) for r in await db.fetch(sql("reservations"), stale_after_s)]


async def insert_admitted_instance(
    db: Executor,
    model: str,
    concurrency: int,
    expiration_s: int,
    runtime: str,
    owner: int | None,
    device: str,
    reserved_bytes: int,
    reason: str,
    host_reserved_bytes: int = 0,
    engine: str | None = None,
    source_path: str | None = None,
) -> InstanceRow | None:
    row = await db.fetchrow(
        sql("insert_admitted_instance"),
        model,
        concurrency,
        expiration_s,
        runtime,
        owner,
        device,
        reserved_bytes,
        reason,
        host_reserved_bytes,
        engine,
        source_path,
    )
    return _instance(row)


async def evict_instance(
    db: Executor, instance_id: int, reason: str, stale_after_s: float
) -> InstanceRow | None:
    return _instance(await db.fetchrow(sql("evict_instance"), instance_id, reason, stale_after_s))


async def upsert_pending_load(
    db: Executor,
    model: str,
    concurrency: int,
    expiration_s: int,
    owner: int | None,
    engine: str | None = None,
) -> None:
    await db.execute(sql("upsert_pending_load"), model, concurrency, expiration_s, owner, engine)


async def pending_loads(db: Executor) -> list[PendingLoadRow]:
    return [PendingLoadRow.of(r) for r in await db.fetch(sql("pending_loads"))]


async def delete_pending_load(db: Executor, model: str) -> None:
    await db.execute(sql("delete_pending_load"), model)


async def evictions_for_model(db: Executor, model: str) -> int:
    return int(await db.fetchval(sql("evictions_for_model"), model))


async def set_reserved_bytes(
    db: Executor, instance_id: int, mem_bytes: int, host_bytes: int = 0
) -> InstanceRow | None:
    return _instance(
        await db.fetchrow(sql("set_reserved_bytes"), instance_id, mem_bytes, host_bytes)
    )


# -- lifecycle events ---------------------------------------------------------------------------


async def max_event_id(db: Executor) -> int:
    return int(await db.fetchval(sql("max_event_id")))


async def events_after(
    db: Executor, after_id: int, owner_key_id: int | None, limit: int
) -> list[LifecycleEventRow]:
    rows = await db.fetch(sql("events_after"), after_id, owner_key_id, limit)
    return [LifecycleEventRow.of(r) for r in rows]


async def events_tail(
    db: Executor, owner_key_id: int | None, limit: int
) -> list[LifecycleEventRow]:
    return [
        LifecycleEventRow.of(r) for r in await db.fetch(sql("events_tail"), owner_key_id, limit)
    ]


async def events_by_ids(db: Executor, ids: Sequence[int]) -> list[LifecycleEventRow]:
    return [LifecycleEventRow.of(r) for r in await db.fetch(sql("events_by_ids"), list(ids))]


async def database_now(db: Executor) -> datetime:
    now: datetime = await db.fetchval(sql("database_now"))
    return now


async def metrics_counts(db: Executor) -> list[tuple[str, str, int]]:
    return [(r["family"], r["label"], int(r["n"])) for r in await db.fetch(sql("metrics_counts"))]
