"""Which kind of device a load goes to, and what it reserves there: pure functions, no IO.

Models are measured per kind of device (`cpu`, `cuda`: every GPU of a host is alike). An
instance on the host reserves its measured host memory there; an instance on `cuda:N` reserves
its measured VRAM on that GPU *and* its measured host memory on the host (weights are staged in
RAM, the process keeps its own heap and the CUDA runtime's). Both figures come from the `cuda`
profile, corrected upwards by what running instances were seen to reach.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarker.estimate import Profile, gpu_for_concurrency, ram_for_concurrency, with_margin
from control_plane.device_names import HOST_DEVICE, local_of
from control_plane.placement import Device

AUTO, CPU, CUDA = "auto", "cpu", "cuda"
REQUESTABLE = (AUTO, CPU, CUDA)


def kind_of(device: str) -> str:
    """The profile key of a device: 'cpu' or 'cuda' for 'cuda:N' (on any node)."""
    return local_of(device).split(":", 1)[0]


def choose_kind(requested: str, devices: list[Device], live_device: str | None) -> str:
    """The kind a load measures and places on: a live instance keeps its own.

    `auto` takes a GPU where the host has one (a model not measured on it is benchmarked there
    first), else the host; `cpu` and `cuda` are what the load asked for.
    """
    if live_device is not None:
        return kind_of(live_device)
    if requested == AUTO:
        return CUDA if any(kind_of(d.name) == CUDA for d in devices) else CPU
    return requested


def candidates(kind: str, devices: list[Device]) -> tuple[list[Device], Device | None]:
    """The devices a load of `kind` may go to, and the host when its RAM is reserved beside.

    Across the nodes of a cluster every node's host is a candidate for `cpu`; the hosts
    beside GPUs there are `hosts(devices)`, one per node.
    """
    host = next((d for d in devices if d.name == HOST_DEVICE), None)
    if kind == CPU:
        return [d for d in devices if local_of(d.name) == HOST_DEVICE], None
    return [d for d in devices if kind_of(d.name) == kind], host


def hosts(devices: list[Device]) -> list[Device]:
    """The host-memory device of every node (one on a single host)."""
    return [d for d in devices if local_of(d.name) == HOST_DEVICE]


@dataclass(frozen=True)
class Observed:
    """The highest memory running instances of a model reached at a concurrency or below."""

    rss_bytes: int | None = None
    gpu_bytes: int | None = None


@dataclass(frozen=True)
class Need:
    """What an instance of one kind reserves; `device_bytes` None: not measured on this kind."""

    kind: str
    device_bytes: int | None  # host RAM for `cpu`, VRAM for `cuda`
    host_bytes: int = 0  # host RAM beside a GPU (0 for `cpu`: device_bytes is host RAM)


def need_on(
    kind: str,
    profile: Profile | None,
    concurrency: int,
    catalog_ram_bytes: int | None,
    observed: Observed = Observed(),
) -> Need:
    """What an instance of `kind` serving `concurrency` at once reserves, from its profile."""
    if kind == CPU:
        if profile is not None and profile.phases:
            estimate = ram_for_concurrency(profile, concurrency)
            # The catalog figure (concurrency 1) rises when a running instance was seen above
            # it; memory never shrinks as concurrency grows.
            return Need(CPU, max(estimate, catalog_ram_bytes or 0))
        return Need(CPU, catalog_ram_bytes)
    if profile is None or not profile.phases:
        return Need(kind, None)
    vram = gpu_for_concurrency(profile, concurrency)
    if vram is None:
        return Need(kind, None)  # measured without a GPU reading: nothing to reserve from
    host = ram_for_concurrency(profile, concurrency)
    # Live readings correct the profile: an instance seen above it raises what is reserved.
    if observed.gpu_bytes:
        vram = max(vram, with_margin(observed.gpu_bytes))
    if observed.rss_bytes:
        host = max(host, with_margin(observed.rss_bytes))
    return Need(kind, vram, host)
