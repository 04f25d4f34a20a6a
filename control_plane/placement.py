"""Admission: may a model load, on which device, and which idle instances must go first.

Pure functions over data (devices, reservations, the request, `now`); control_plane/admission.py
carries the data in and out of PostgreSQL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from control_plane.device_names import HOST_DEVICE, host_of, node_of

# Headroom kept free on every device beyond the reservations (allocator slack, the OS, the
# control plane itself): 10% of the device, at least 256 MiB.
MARGIN_FRACTION = 0.10
MARGIN_MIN_BYTES = 256 * 1024 * 1024
__all__ = ["HOST_DEVICE"]  # re-exported: callers take the host's name from here


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
    # Host memory an instance on a GPU holds beside its VRAM (0 on the host: mem_bytes is that).
    host_bytes: int = 0

    def usage(self) -> dict[str, int]:
        """Bytes this instance holds per device: its own device, and the host's RAM."""
        out = {self.device: self.mem_bytes}
        if self.host_bytes:
            host = host_of(self.device)  # the host of its own node
            out[host] = out.get(host, 0) + self.host_bytes
        return out


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
    need_bytes: int,
    devices: list[Device],
    reservations: list[Reservation],
    now: datetime,
    *,
    host: Device | None = None,
    host_bytes: int = 0,
) -> Decision:
    """Where `need_bytes` can go among `devices`: best fit, else the cheapest idle evictions.

    With `host` and `host_bytes` (a GPU placement), the host's RAM must hold `host_bytes` too:
    an instance on a GPU also reserves its host memory, so the host can be the binding limit.
    """
    host_need = host_bytes if host is not None else 0
    if host is not None and host_need > host.usable_bytes:
        return NeverFits(host.usable_bytes)
    if not devices or all(need_bytes > d.usable_bytes for d in devices):
        return NeverFits(max((d.usable_bytes for d in devices), default=0))
    usable = {d.name: d.usable_bytes for d in devices}
    if host is not None:
        usable[host.name] = host.usable_bytes
    used: dict[str, int] = dict.fromkeys(usable, 0)
    for r in reservations:
        for name, held in r.usage().items():
            if name in used:
                used[name] += held
    fits: list[tuple[int, str]] = []
    options: list[tuple[tuple[int, float], Evict]] = []
    for d in devices:
        if need_bytes > d.usable_bytes:
            continue
        need = {d.name: need_bytes}
        if host is not None and host_need:
            need[host.name] = need.get(host.name, 0) + host_need
        free = {name: usable[name] - used[name] for name in need}
        if all(free[n] >= need[n] for n in need):
            fits.append((free[d.name] - need_bytes, d.name))
            continue
        evict = _evictions(d.name, need, free, reservations, now)
        if evict is not None:
            options.append(evict)
    if fits:
        headroom, name = min(fits)  # best fit: the least space left over
        return Fit(name, headroom)
    if options:
        return min(options, key=lambda o: o[0])[1]
    free_now = max(usable[d.name] - used[d.name] for d in devices)
    if host is not None and host_need:
        free_now = min(free_now, usable[host.name] - used[host.name])
    busy = [r for r in reservations if not is_evictable(r)]
    return Full(retry_after_s=retry_after(busy), free_bytes=max(0, free_now))


def decide_across(
    need_bytes: int,
    devices: list[Device],
    reservations: list[Reservation],
    now: datetime,
    *,
    host: Device | None = None,
    hosts: Sequence[Device] = (),
    host_bytes: int = 0,
) -> Decision:
    """`decide` over the devices of several nodes: each node on its own, the best of them.

    On one host (devices of no node) this is `decide`. Across nodes, a GPU's host memory is
    reserved on its own node's host, found in `hosts`; a fit anywhere beats an eviction, and
    a need that fits no single node never fits, whatever the nodes hold together.
    """
    groups: dict[str | None, list[Device]] = {}
    for d in devices:
        groups.setdefault(node_of(d.name), []).append(d)
    if (len(groups) <= 1 and None in groups) or not groups:
        return decide(need_bytes, devices, reservations, now, host=host, host_bytes=host_bytes)
    by_name = {h.name: h for h in hosts}
    results: list[Decision] = []
    for node, group in groups.items():
        beside = by_name.get(host_of(group[0].name)) if host_bytes or host else None
        if node is None:
            beside = host
        results.append(
            decide(
                need_bytes,
                group,
                reservations,
                now,
                host=beside,
                host_bytes=host_bytes if beside is not None else 0,
            )
        )
    fits = [r for r in results if isinstance(r, Fit)]
    if fits:
        return min(fits, key=lambda f: (f.headroom_bytes, f.device))
    evicts = [r for r in results if isinstance(r, Evict)]
    if evicts:
        return min(evicts, key=lambda e: (len(e.victims), sum(v.reload_s for v in e.victims)))
    fulls = [r for r in results if isinstance(r, Full)]
    if fulls:
        return Full(
            retry_after_s=min(f.retry_after_s for f in fulls),
            free_bytes=max(f.free_bytes for f in fulls),
        )
    return NeverFits(max(r.largest_device_bytes for r in results if isinstance(r, NeverFits)))


def _evictions(
    device: str,
    need: dict[str, int],
    free: dict[str, int],
    reservations: list[Reservation],
    now: datetime,
) -> tuple[tuple[int, float], Evict] | None:
    """The idle instances to stop so that `need` fits on every device it names, with its cost."""
    free = dict(free)

    def short() -> set[str]:
        return {n for n in need if free[n] < need[n]}

    def release(r: Reservation, sign: int) -> None:
        for name, held in r.usage().items():
            if name in free:
                free[name] += sign * held

    victims: list[Reservation] = []
    candidates = sorted(
        (r for r in reservations if is_evictable(r) and set(r.usage()) & set(need)),
        key=lambda r: eviction_order(r, now),
    )
    for r in candidates:
        missing = short()
        if not missing:
            break
        if set(r.usage()) & missing:
            victims.append(r)
            release(r, +1)
    # A victim taken early may be unneeded once a larger one joined (0.5 GB, then 2 GB for a
    # 2 GB need): spare those, the most recently used first.
    for r in reversed(victims[:-1]):
        release(r, -1)
        if short():
            release(r, +1)
        else:
            victims.remove(r)
    if short():
        return None
    cost = (len(victims), sum(v.reload_s for v in victims))
    return cost, Evict(device, tuple(victims), free[device] - need[device])


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
    host: Device | None = None,
    host_bytes: int = 0,
    hosts: Sequence[Device] = (),
    beside: bool = False,
) -> LoadPlan:
    """What a load of `model` needing `need_bytes` does, given every reservation held now.

    The same plan answers a dry run and the real call: a live model grows in place (on its own
    device, beside everything else there), a new one is placed where it fits best. `devices`
    are those of the kind the need was measured on; for GPUs, `host` and `host_bytes` add the
    host memory the instance holds beside its VRAM. With `beside` (a redeployed API rolling
    over), the model's live instances are held like any other's and a second one is placed.
    """
    # The newest of the model's instances: while an API rolls over, the new version's, not the
    # previous one draining beside it.
    mine = [] if beside else [r for r in reservations if r.model == model]
    own = max(mine, key=lambda r: r.instance_id, default=None)
    if own is not None and own.state == "STOPPING":
        return Stopping(own.instance_id)
    if own is not None:
        grow_host = host_bytes > own.host_bytes
        if need_bytes is None or (need_bytes <= own.mem_bytes and not grow_host):
            return Retune(own, None)
        others = [r for r in reservations if r.instance_id != own.instance_id]
        here = [d for d in devices if d.name == own.device]
        need = max(need_bytes, own.mem_bytes)
        return Retune(
            own,
            decide_across(need, here, others, now, host=host, hosts=hosts, host_bytes=host_bytes),
        )
    if need_bytes is None:
        return QueueBenchmark() if benchmark and not dry_run else NotMeasured()
    return Place(
        decide_across(
            need_bytes, devices, reservations, now, host=host, hosts=hosts, host_bytes=host_bytes
        )
    )
