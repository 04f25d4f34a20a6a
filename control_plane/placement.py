"""Admission: may a model load, on which device, and which idle instances must go first.

Pure functions over data (devices, reservations, the request, `now`); control_plane/admission.py
carries the data in and out of PostgreSQL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

# Headroom kept free on every device beyond the reservations (allocator slack, the OS, the
# control plane itself): 10% of the device, at least 256 MiB.
MARGIN_FRACTION = 0.10
MARGIN_MIN_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Device:
    name: str  # "cpu" or "cuda:N"
    total_bytes: int

    @property
    def usable_bytes(self) -> int:
        return max(
            0, self.total_bytes - max(MARGIN_MIN_BYTES, int(self.total_bytes * MARGIN_FRACTION))
        )


@dataclass(frozen=True)
class Reservation:
    instance_id: int
    model: str
    device: str
    mem_bytes: int
    in_flight: int
    last_used_at: datetime
    reload_s: float  # how long this model takes to load again (its benchmarked load time)
    state: str  # an instance STOPPING still holds its memory until it is really gone


@dataclass(frozen=True)
class Fit:
    device: str
    headroom_bytes: int  # free after placing the new instance


@dataclass(frozen=True)
class Evict:
    device: str
    victims: tuple[Reservation, ...]
    headroom_bytes: int


@dataclass(frozen=True)
class NeverFits:
    largest_device_bytes: int


@dataclass(frozen=True)
class Full:
    retry_after_s: int
    free_bytes: int


Decision = Fit | Evict | NeverFits | Full


def eviction_order(r: Reservation, now: datetime) -> tuple[float, float]:
    """Victims first: the longest idle, then the quickest to reload."""
    idle_s = (now - r.last_used_at).total_seconds()
    return (-idle_s, r.reload_s)


def is_evictable(r: Reservation) -> bool:
    return r.in_flight == 0 and r.state == "RUNNING"


def decide(
    need_bytes: int, devices: list[Device], reservations: list[Reservation], now: datetime
) -> Decision:
    """Where `need_bytes` can go: best fit, else the cheapest idle evictions, else why not."""
    if not devices or all(need_bytes > d.usable_bytes for d in devices):
        return NeverFits(max((d.usable_bytes for d in devices), default=0))
    used: dict[str, int] = {d.name: 0 for d in devices}
    for r in reservations:
        if r.device in used:
            used[r.device] += r.mem_bytes
    fits = [
        (d.usable_bytes - used[d.name] - need_bytes, d.name)
        for d in devices
        if d.usable_bytes - used[d.name] >= need_bytes
    ]
    if fits:
        headroom, name = min(fits)  # best fit: the least space left over
        return Fit(name, headroom)
    options: list[tuple[tuple[int, float], Evict]] = []
    for d in devices:
        if need_bytes > d.usable_bytes:
            continue
        free = d.usable_bytes - used[d.name]
        victims: list[Reservation] = []
        candidates = sorted(
            (r for r in reservations if r.device == d.name and is_evictable(r)),
            key=lambda r: eviction_order(r, now),
        )
        for r in candidates:
            if free >= need_bytes:
                break
            victims.append(r)
            free += r.mem_bytes
        # A victim taken early may be unneeded once a larger one joined (0.5 GB, then 2 GB for a
        # 2 GB need): spare those, the most recently used first.
        for r in reversed(victims[:-1]):
            if free - r.mem_bytes >= need_bytes:
                victims.remove(r)
                free -= r.mem_bytes
        if free >= need_bytes:
            cost = (len(victims), sum(v.reload_s for v in victims))
            options.append((cost, Evict(d.name, tuple(victims), free - need_bytes)))
    if options:
        return min(options, key=lambda o: o[0])[1]
    free_now = max(d.usable_bytes - used[d.name] for d in devices)
    busy = [r for r in reservations if not is_evictable(r)]
    return Full(retry_after_s=retry_after(busy), free_bytes=max(0, free_now))


def retry_after(busy: list[Reservation]) -> int:
    """A hint for 503s: instances stopping free memory within seconds; busy ones take longer."""
    if any(r.state == "STOPPING" for r in busy):
        return 2
    return 10 if busy else 5


def bytes_to_gb(mem_bytes: int) -> float:
    return math.floor(mem_bytes / 1e7) / 100


# -- the plan for one /model/load --------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """No instance of the model is live: place a new one (or refuse, as `decision` says)."""

    decision: Decision


@dataclass(frozen=True)
class Retune:
    """The model is live: change its settings; `decision` places the extra memory it needs."""

    live: Reservation
    decision: Decision | None  # None: its reservation already covers the new concurrency


@dataclass(frozen=True)
class Stopping:
    """The model's instance is stopping: nothing can be placed for it until it is gone."""

    instance_id: int


@dataclass(frozen=True)
class QueueBenchmark:
    """The model is not measured yet and the load asked to benchmark it first."""


@dataclass(frozen=True)
class NotMeasured:
    """The model is not measured yet: nothing can be reserved for it."""


LoadPlan = Place | Retune | Stopping | QueueBenchmark | NotMeasured


def plan_load(
    model: str,
    need_bytes: int | None,
    devices: list[Device],
    reservations: list[Reservation],
    now: datetime,
    *,
    benchmark: bool = False,
    dry_run: bool = False,
) -> LoadPlan:
    """What a load of `model` needing `need_bytes` does, given every reservation held now.

    The same plan answers a dry run and the real call: a live model grows in place (on its own
    device, beside everything else there), a new one is placed where it fits best.
    """
    own = next((r for r in reservations if r.model == model), None)
    if own is not None and own.state == "STOPPING":
        return Stopping(own.instance_id)
    if own is not None:
        if need_bytes is None or need_bytes <= own.mem_bytes:
            return Retune(own, None)
        others = [r for r in reservations if r.instance_id != own.instance_id]
        here = [d for d in devices if d.name == own.device]
        return Retune(own, decide(need_bytes, here, others, now))
    if need_bytes is None:
        return QueueBenchmark() if benchmark and not dry_run else NotMeasured()
    return Place(decide(need_bytes, devices, reservations, now))
