"""Admission on /model/load: the IO around placement.decide, serialized in PostgreSQL.

The reservations of every live instance are read, decided on, and the new instance (and any
evictions) written in one transaction under an advisory lock, so two control planes sharing a
database never overbook the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from benchmarker.estimate import Phase, Profile, ram_for_concurrency
from control_plane import capacity
from control_plane.errors import Conflict, Invalid, ServiceUnavailable
from control_plane.placement import (
    Decision,
    Evict,
    Fit,
    Full,
    NeverFits,
    Reservation,
    bytes_to_gb,
    decide,
)
from control_plane.reaper import STALE_ACTIVITY_S
from control_plane.settings import Settings
from db import queries
from db.pool import Pool
from db.queries import Executor
from db.rows import InstanceRow, ModelProfileRow, ModelRow, ReservationRow

DEVICE_KIND = "cpu"


class NotBenchmarked(Conflict):
    """The model has not been benchmarked yet."""

    code = "not_benchmarked"


class NeverFitsError(Invalid):
    """The model can never fit on this host."""

    code = "insufficient_memory"


class HostFull(ServiceUnavailable):
    """Not enough memory is free now, and nothing idle can be evicted."""

    code = "capacity_full"


@dataclass(frozen=True)
class Admission:
    decision: Decision
    need_bytes: int
    row: InstanceRow | None  # the new STARTING instance; None for a dry run or a lost race
    evicted: tuple[InstanceRow, ...] = ()


def profile_from_row(row: ModelProfileRow) -> Profile:
    phases = tuple(
        Phase(
            int(p["concurrency"]),
            int(p["peakRssBytes"]),
            p.get("peakGpuBytes"),
            int(p.get("tokens", 0)),
            float(p.get("seconds", 0.0)),
        )
        for p in row.phases
    )
    return Profile(row.device_kind, row.load_s, 0, phases)


async def need_bytes(pool: Pool, model: ModelRow, concurrency: int) -> int | None:
    """Memory an instance of `model` serving `concurrency` at once will reserve, or None."""
    profile = await queries.get_model_profile(pool, model.name, DEVICE_KIND)
    if profile is not None and profile.phases:
        estimate = ram_for_concurrency(profile_from_row(profile), concurrency)
        # The catalog figure (concurrency 1) rises when a running instance was seen above it
        # (queries.record_model_observation); memory never shrinks as concurrency grows.
        return max(estimate, model.required_ram_bytes or 0)
    return model.required_ram_bytes


def plan_body(model: str, concurrency: int, need: int, decision: Decision) -> dict[str, Any]:
    """The admission plan as shown for `"dryRun": true`."""
    out: dict[str, Any] = {
        "model": model,
        "concurrency": concurrency,
        "requiredBytes": need,
        "requiredRAM": bytes_to_gb(need),
        "device": None,
        "evictions": [],
        "headroomBytes": None,
    }
    if isinstance(decision, Fit):
        out.update(decision="fits", device=decision.device, headroomBytes=decision.headroom_bytes)
    elif isinstance(decision, Evict):
        out.update(
            decision="evict",
            device=decision.device,
            headroomBytes=decision.headroom_bytes,
            evictions=[
                {
                    "model": v.model,
                    "reservedBytes": v.mem_bytes,
                    "idleSince": v.last_used_at.isoformat(),
                }
                for v in decision.victims
            ],
        )
    elif isinstance(decision, NeverFits):
        out.update(decision="never_fits", largestDeviceBytes=decision.largest_device_bytes)
    else:
        out.update(
            decision="full", freeBytes=decision.free_bytes, retryAfterSeconds=decision.retry_after_s
        )
    return out


async def admit(
    pool: Pool,
    settings: Settings,
    runtime: str,
    model: ModelRow,
    concurrency: int,
    expiration_s: int,
    owner: int | None,
    now: datetime,
    *,
    dry_run: bool = False,
) -> Admission:
    """Decide, and unless `dry_run`, record the new instance and its evictions atomically."""
    need = await need_bytes(pool, model, concurrency)
    if need is None:
        raise NotBenchmarked(
            f"model {model.name} has not been benchmarked; request it first with "
            'POST /model/job, or load with "benchmark": true',
        )
    devices = capacity.devices(capacity.observe(settings.host_memory_bytes, settings.use_gpus))
    async with pool.acquire() as conn, conn.transaction():
        await queries.lock_admission(conn)
        rows = await queries.reservations(conn, STALE_ACTIVITY_S)
        held = _held(rows)
        decision = decide(need, devices, held, now)
        if dry_run:
            return Admission(decision, need, None)
        if any(r.model == model.name for r in held):
            # A concurrent load of the same model won: evicting for it would stop instances for
            # nothing (the insert below would do nothing). The caller treats it as a repeat.
            return Admission(decision, need, None)
        _refuse(decision, model.name, need, concurrency)
        assert isinstance(decision, Fit | Evict)
        evicted = await _evict(conn, decision, model.name)
        row = await queries.insert_admitted_instance(
            conn,
            model.name,
            concurrency,
            expiration_s,
            runtime,
            owner,
            decision.device,
            need,
            "load requested",
        )
        return Admission(decision, need, row, tuple(evicted))


def _held(rows: list[ReservationRow]) -> list[Reservation]:
    return [
        Reservation(
            r.id,
            r.model,
            r.device,
            r.reserved_bytes,
            r.in_flight,
            r.last_used_at,
            r.reload_s,
            r.state,
        )
        for r in rows
    ]


def _refuse(decision: Decision, model: str, need: int, concurrency: int) -> None:
    """Raise the error a decision that places nothing stands for."""
    if isinstance(decision, NeverFits):
        raise NeverFitsError(
            f"model {model} needs {bytes_to_gb(need)} GB at concurrency {concurrency}; "
            f"the largest device here has {bytes_to_gb(decision.largest_device_bytes)} GB usable"
        )
    if isinstance(decision, Full):
        raise HostFull(
            f"not enough memory for {model} ({bytes_to_gb(need)} GB): "
            f"{bytes_to_gb(decision.free_bytes)} GB free and no idle instance to evict",
            retry_after_s=decision.retry_after_s,
        )


async def _evict(conn: Executor, decision: Decision, model: str) -> tuple[InstanceRow, ...]:
    """Move a plan's victims to STOPPING (idle ones only) inside the admission transaction."""
    evicted: list[InstanceRow] = []
    if isinstance(decision, Evict):
        for victim in decision.victims:
            moved = await queries.evict_instance(
                conn, victim.instance_id, f"evicted to make room for {model}", STALE_ACTIVITY_S
            )
            if moved is None:
                # It became busy since it was read: give up this plan (the transaction rolls
                # back) and let the client retry.
                raise HostFull(
                    "an instance chosen for eviction became busy; retry", retry_after_s=1
                )
            evicted.append(moved)
    return tuple(evicted)


async def grow(
    pool: Pool,
    settings: Settings,
    live: InstanceRow,
    model: ModelRow,
    concurrency: int,
    now: datetime,
) -> tuple[InstanceRow, ...]:
    """Re-admit a live instance whose concurrency grows; return what must be evicted first.

    More concurrent requests need more memory (the batch grows): the new figure must fit on the
    instance's own device beside everything else, or the load is refused like a new one.
    """
    need = await need_bytes(pool, model, concurrency)
    if need is None or need <= live.reserved_bytes:
        return ()
    devices = [
        d
        for d in capacity.devices(capacity.observe(settings.host_memory_bytes, settings.use_gpus))
        if d.name == live.device
    ]
    async with pool.acquire() as conn, conn.transaction():
        await queries.lock_admission(conn)
        others = [r for r in await queries.reservations(conn, STALE_ACTIVITY_S) if r.id != live.id]
        decision = decide(need, devices, _held(others), now)
        _refuse(decision, model.name, need, concurrency)
        evicted = await _evict(conn, decision, model.name)
        await queries.set_reserved_bytes(conn, live.id, need)
        return evicted
