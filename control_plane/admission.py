"""Admission on /model/load: the IO around placement.decide, serialized in PostgreSQL.

The reservations of every live instance are read, decided on, and the new instance (and any
evictions) written in one transaction under an advisory lock, so two control planes sharing a
database never overbook the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from benchmarker.estimate import Phase, Profile
from control_plane import capacity
from control_plane.device_kind import (
    AUTO,
    CPU,
    CUDA,
    Need,
    Observed,
    candidates,
    choose_kind,
    hosts,
    need_on,
)
from control_plane.errors import CapacityFull, InsufficientMemory, NoGpu, StateChanging
from control_plane.placement import (
    Decision,
    Device,
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


@dataclass(frozen=True)
class Admission:
    plan: LoadPlan
    need_bytes: int | None  # on the device: host RAM on `cpu`, VRAM on a GPU
    row: InstanceRow | None = None  # the new STARTING instance (a Place that was carried out)
    evicted: tuple[InstanceRow, ...] = ()  # stopped to make room; gone before the start
    kind: str = CPU  # the kind of device the plan is for
    host_bytes: int = 0  # host RAM reserved beside a GPU


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


async def need_for(db: Executor, model: ModelRow, concurrency: int, kind: str) -> Need:
    """What an instance of `model` on `kind` serving `concurrency` at once will reserve."""
    profile = await queries.get_model_profile(db, model.name, kind)
    rss, gpu = await queries.observed_peaks(db, model.name, kind, concurrency)
    if kind == CPU and profile is None:
        # The catalog figure stands for the host only when no other kind measured it.
        if await queries.get_model_profile(db, model.name, CUDA) is not None:
            return Need(CPU, None)
    return need_on(
        kind,
        None if profile is None else profile_from_row(profile),
        concurrency,
        model.required_ram_bytes,
        Observed(rss, gpu),
    )


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
        "deviceKind": admission.kind,
        "hostBytes": admission.host_bytes if admission.kind != CPU else None,
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
    device: str = AUTO,
    devices: list[Device] | None = None,
    engine: str | None = None,
    beside: bool = False,
) -> Admission:
    """Plan a load of `model` and, unless `dry_run`, carry out its memory side atomically.

    In one transaction under the admission lock: read every reservation, choose the kind of
    device (device_kind.py), plan (placement.py), and write the plan: evictions, the new
    STARTING instance, or a live instance's larger reservation. A plan that places nothing
    raises the error it stands for (not on a dry run). Settings of a live instance are the
    caller's to apply once the evictions are gone. `devices` replaces this host's readings
    (host RAM and NVML's GPUs) where given.

    With `beside` (a redeployed API's rollover), the new instance is placed next to the model's
    live one only where it fits as things are: nothing is evicted for it, and when it does not
    fit the admission has no row (the caller stops the old instance first, then loads).
    """
    if devices is None:
        devices = capacity.devices(capacity.observe(settings.host_memory_bytes, settings.use_gpus))
    async with pool.acquire() as conn, conn.transaction():
        await queries.lock_admission(conn)
        held = _held(await queries.reservations(conn, STALE_ACTIVITY_S))
        own = next((r for r in held if r.model == model.name), None)
        kind = choose_kind(device, devices, None if own is None else own.device)
        targets, host = candidates(kind, devices)
        if not targets and kind == CUDA:
            raise NoGpu(f'no GPU here for {model.name}: load with "device": "cpu"')
        need = await need_for(conn, model, concurrency, kind)
        plan = plan_load(
            model.name,
            need.device_bytes,
            targets,
            held,
            now,
            benchmark=benchmark,
            dry_run=dry_run,
            host=host,
            host_bytes=need.host_bytes,
            hosts=hosts(devices),
            beside=beside,
        )
        done = Admission(plan, need.device_bytes, kind=kind, host_bytes=need.host_bytes)
        if dry_run or not isinstance(plan, Place | Retune) or need.device_bytes is None:
            return done
        if beside and not (isinstance(plan, Place) and isinstance(plan.decision, Fit)):
            return done
        need_bytes = need.device_bytes
        if isinstance(plan, Retune):
            if plan.decision is None:
                return done
            _refuse(plan.decision, model.name, need_bytes, concurrency, need.host_bytes)
            evicted = await _evict(conn, plan.decision, model.name)
            grown = max(need_bytes, plan.live.mem_bytes)
            host_grown = max(need.host_bytes, plan.live.host_bytes)
            await queries.set_reserved_bytes(conn, plan.live.instance_id, grown, host_grown)
            return Admission(plan, grown, None, evicted, kind, host_grown)
        _refuse(plan.decision, model.name, need_bytes, concurrency, need.host_bytes)
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
            need_bytes,
            "load requested",
            need.host_bytes,
            engine,
            model.source_path if model.source_kind == "apis" else None,
        )
        if row is None:
            # Only a live row written without the admission lock could be in the way.
            raise StateChanging(f"an instance of {model.name} appeared meanwhile; retry")
        return Admission(plan, need_bytes, row, evicted, kind, need.host_bytes)


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
            r.host_reserved_bytes,
        )
        for r in rows
    ]


def _refuse(
    decision: Decision, model: str, need: int, concurrency: int, host_bytes: int = 0
) -> None:
    """Raise the error a decision that places nothing stands for."""
    if isinstance(decision, NeverFits):
        what = f"{bytes_to_gb(need)} GB"
        if host_bytes:
            what = f"{what} on a GPU and {bytes_to_gb(host_bytes)} GB of host memory"
        raise InsufficientMemory(
            f"model {model} needs {what} at concurrency {concurrency}; the largest device "
            f"it needs here has {bytes_to_gb(decision.largest_device_bytes)} GB usable"
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
