"""Admission by device kind against a real PostgreSQL, with the readings a fake NVML gives.

The host has 10 GB (9 GB usable), a small GPU 20 GB (18 GB usable) and a large one 80 GB (72 GB
usable). What admission writes (device, VRAM reservation, host reservation) is read back by the
next admission, so reservations across kinds add up through the database.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import pytest

from benchmarker.estimate import Phase, Profile, phases_json, with_margin
from control_plane.admission import admit
from control_plane.errors import CapacityFull, InsufficientMemory, NoGpu
from control_plane.placement import Device, Fit, NotMeasured, Place
from control_plane.settings import Settings
from db import queries
from db.rows import ModelRow

GB = 1_000_000_000
NOW = datetime(2026, 1, 1, tzinfo=UTC)
HOST = Device("cpu", 10 * GB)
GPUS = [Device("cuda:0", 20 * GB), Device("cuda:1", 80 * GB)]
READINGS = [HOST, *GPUS]


async def add_model(
    db: asyncpg.Pool, name: str, *, cpu_gb: float | None, cuda: tuple[float, float] | None
) -> ModelRow:
    """A catalog model measured on the host (`cpu_gb` RSS) and/or a GPU (VRAM, host RSS)."""
    await queries.upsert_discovered_model(db, name, "text-generation", "dir", "/x", None, 1000)
    if cpu_gb is not None:
        rss = int(cpu_gb * GB)
        profile = Profile("cpu", 1.0, rss, (Phase(1, rss, None, 8, 0.5),))
        await queries.upsert_model_profile(
            db, name, "cpu", with_margin(rss), None, 1.0, phases_json(profile), None
        )
        await queries.set_model_measured(db, name, with_margin(rss))
    if cuda is not None:
        vram, rss = int(cuda[0] * GB), int(cuda[1] * GB)
        profile = Profile("cuda", 1.0, rss, (Phase(1, rss, vram, 8, 0.1),))
        await queries.upsert_model_profile(
            db, name, "cuda", with_margin(rss), vram, 1.0, phases_json(profile), None
        )
    row = await queries.get_model(db, name)
    assert row is not None
    return row


async def load(
    db: asyncpg.Pool, settings: Settings, model: ModelRow, *, device: str = "auto"
) -> tuple[str, int, int]:
    done = await admit(
        db, settings, "process", model, 1, 600, None, NOW, device=device, devices=READINGS
    )
    assert isinstance(done.plan, Place) and isinstance(done.plan.decision, Fit), done.plan
    assert done.row is not None
    row = await queries.get_instance(db, done.row.id)
    assert row is not None
    return row.device, row.reserved_bytes, row.host_reserved_bytes


async def test_gpu_placements_reserve_vram_and_host_memory(
    db: asyncpg.Pool, settings: Settings
) -> None:
    both = await add_model(db, "gpu/both", cpu_gb=3, cuda=(12, 2))
    big = await add_model(db, "gpu/big", cpu_gb=None, cuda=(50, 2))
    # Best fit: 12 GB goes on the small GPU, 50 GB only fits the large one.
    assert await load(db, settings, both) == ("cuda:0", with_margin(12 * GB), with_margin(2 * GB))
    assert await load(db, settings, big) == ("cuda:1", with_margin(50 * GB), with_margin(2 * GB))
    cap = [r for r in await queries.reservations(db, 30) if r.device.startswith("cuda")]
    assert sorted(r.host_reserved_bytes for r in cap) == [with_margin(2 * GB)] * 2


async def test_host_memory_is_the_binding_limit_beside_free_vram(
    db: asyncpg.Pool, settings: Settings
) -> None:
    heavy = await add_model(db, "gpu/heavy-host", cpu_gb=None, cuda=(5, 6))
    second = await add_model(db, "gpu/second", cpu_gb=None, cuda=(5, 4))
    on_host = await add_model(db, "cpu/small", cpu_gb=3, cuda=None)
    await load(db, settings, heavy)  # 6.06 GB of the host's 9 usable
    busy = await queries.reservations(db, 30)
    await db.execute("UPDATE instances SET state = 'RUNNING'")  # evictable only when idle
    await db.execute(
        "INSERT INTO instance_activity (instance_id, node_id, in_flight) VALUES ($1, 'n', 1)",
        busy[0].id,
    )
    # 70 GB of VRAM free, but not 4 GB of host memory: full, and a CPU load is too.
    with pytest.raises(CapacityFull):
        await admit(db, settings, "process", second, 1, 600, None, NOW, devices=READINGS)
    with pytest.raises(CapacityFull):
        await admit(
            db, settings, "process", on_host, 1, 600, None, NOW, device="cpu", devices=READINGS
        )
    never = await add_model(db, "gpu/never", cpu_gb=None, cuda=(5, 9.5))
    with pytest.raises(InsufficientMemory, match="host memory"):
        await admit(db, settings, "process", never, 1, 600, None, NOW, devices=READINGS)


async def test_a_model_without_a_cuda_profile(db: asyncpg.Pool, settings: Settings) -> None:
    cpu_only = await add_model(db, "cpu/only", cpu_gb=2, cuda=None)
    # On a GPU host it must be measured there first, unless the load asks for the host.
    plan = await admit(db, settings, "process", cpu_only, 1, 600, None, NOW, devices=READINGS)
    assert isinstance(plan.plan, NotMeasured) and plan.kind == "cuda"
    assert await load(db, settings, cpu_only, device="cpu") == ("cpu", with_margin(2 * GB), 0)
    # A host with no GPU at all: auto is the host, and "cuda" is refused.
    gpu_only = await add_model(db, "gpu/only", cpu_gb=None, cuda=(1, 1))
    with pytest.raises(NoGpu):
        await admit(
            db, settings, "process", gpu_only, 1, 600, None, NOW, device="cuda", devices=[HOST]
        )
    host = await admit(db, settings, "process", gpu_only, 1, 600, None, NOW, devices=[HOST])
    assert (
        isinstance(host.plan, NotMeasured) and host.kind == "cpu"
    )  # its cuda RSS is no cpu figure


async def test_observed_vram_raises_the_next_reservation(
    db: asyncpg.Pool, settings: Settings
) -> None:
    model = await add_model(db, "gpu/grows", cpu_gb=None, cuda=(4, 1))
    await queries.record_model_observation(db, model.name, "cuda", 1, int(1.5 * GB), 6 * GB)
    assert await load(db, settings, model) == (
        "cuda:0",
        with_margin(6 * GB),
        with_margin(int(1.5 * GB)),
    )
