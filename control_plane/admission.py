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
from control_plane.errors import CapacityFull, InsufficientMemory, StateChanging
from control_plane.placement import (
    Decision,
    Evict,
    Fit,
    Full,
    LoadPlan,
    NeverFits,
    Place,
    Reservation,
    Retune,
    Stopping,
    bytes_to_gb,
    plan_load,
)
from control_plane.reaper import STALE_ACTIVITY_S
from control_plane.settings import Settings
from db import queries
from db.pool import Pool
from db.queries import Executor
from db.rows import InstanceRow, ModelProfileRow, ModelRow, ReservationRow

DEVICE_KIND = "cpu"


@dataclass(frozen=True)
class Admission:
    plan: LoadPlan
    need_bytes: int | None
    row: InstanceRow | None = None  # the new STARTING instance (a Place that was carried out)
    evicted: tuple[InstanceRow, ...] = ()  # stopped to make room; gone before the start


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


def plan_body(model: str, concurrency: int, admission: Admission) -> dict[str, Any]:
    """The admission plan as shown for `"dryRun": true`: what the real call would do."""
    need = admission.need_bytes
    plan = admission.plan
    out: dict[str, Any] = {
        "dryRun": True,
        "model": model,
        "concurrency": concurrency,
        "requiredBytes": need,
        "requiredRAM": None if need is None else bytes_to_gb(need),
        "device": None,
        "evictions": [],
        "headroomBytes": None,
        "loaded": isinstance(plan, Retune),
    }
    if isinstance(plan, Retune):
        out["device"] = plan.live.device
        if plan.decision is None:
            out.update(decision="loaded", requiredBytes=plan.live.mem_bytes)
            return out
        out.update(_decision_body(plan.decision))
        if out["decision"] == "fits":
            out["decision"] = "grow"
        return out
    if isinstance(plan, Place):
        out.update(_decision_body(plan.decision))
        return out
    if isinstance(plan, Stopping):
        out.update(decision="stopping")
        return out
    out.update(decision="not_benchmarked")
    return out


def _decision_body(decision: Decision) -> dict[str, Any]:
    if isinstance(decision, Fit):
        return {
            "decision": "fits",
            "device": decision.device,
            "headroomBytes": decision.headroom_bytes,
        }
    if isinstance(decision, Evict):
        return {
            "decision": "evict",
            "device": decision.device,
            "headroomBytes": decision.headroom_bytes,
            "evictions": [
                {
                    "model": v.model,
                    "reservedBytes": v.mem_bytes,
                    "idleSince": v.last_used_at.isoformat(),
                }
                for v in decision.victims
            ],
        }
    if isinstance(decision, NeverFits):
        return {"decision": "never_fits", "largestDeviceBytes": decision.largest_device_bytes}
    return {
        "decision": "full",
        "freeBytes": decision.free_bytes,
        "retryAfterSeconds": decision.retry_after_s,
    }


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
    benchmark: bool = False,
) -> Admission:
    """Plan a load of `model` and, unless `dry_run`, carry out its memory side atomically.

    In one transaction under the admission lock: read every reservation, plan (placement.py),
    and write the plan: evictions, the new STARTING instance, or a live instance's larger
    reservation. A plan that places nothing raises the error it stands for (not on a dry run).
    Settings of a live instance are the caller's to apply once the evictions are gone.
    """
    need = await need_bytes(pool, model, concurrency)
    devices = capacity.devices(capacity.observe(settings.host_memory_bytes, settings.use_gpus))
    async with pool.acquire() as conn, conn.transaction():
        await queries.lock_admission(conn)
        held = _held(await queries.reservations(conn, STALE_ACTIVITY_S))
        plan = plan_load(model.name, need, devices, held, now, benchmark=benchmark, dry_run=dry_run)
        if dry_run or not isinstance(plan, Place | Retune) or need is None:
            return Admission(plan, need)
        if isinstance(plan, Retune):
            if plan.decision is None:
                return Admission(plan, need)
            _refuse(plan.decision, model.name, need, concurrency)
            evicted = await _evict(conn, plan.decision, model.name)
            await queries.set_reserved_bytes(conn, plan.live.instance_id, need)
            return Admission(plan, need, None, evicted)
        _refuse(plan.decision, model.name, need, concurrency)
        assert isinstance(plan.decision, Fit | Evict)
        evicted = await _evict(conn, plan.decision, model.name)
        row = await queries.insert_admitted_instance(
            conn,
            model.name,
            concurrency,
            expiration_s,
            runtime,
            owner,
            plan.decision.device,
            need,
            "load requested",
        )
        if row is None:
            # Only a live row written without the admission lock could be in the way.
            raise StateChanging(f"an instance of {model.name} appeared meanwhile; retry")
        return Admission(plan, need, row, evicted)


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
        raise InsufficientMemory(
            f"model {model} needs {bytes_to_gb(need)} GB at concurrency {concurrency}; "
            f"the largest device here has {bytes_to_gb(decision.largest_device_bytes)} GB usable"
        )
    if isinstance(decision, Full):
        raise CapacityFull(
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
                raise CapacityFull(
                    "an instance chosen for eviction became busy; retry", retry_after_s=1
                )
            evicted.append(moved)
    return tuple(evicted)
