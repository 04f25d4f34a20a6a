"""Memory-aware admission through the API: fake agents of declared sizes on a declared host.

The host declares 4 GB (`host_memory_bytes`), so 3.6 GB is usable after the 10% margin: three
1 GB instances fit, a fourth needs an eviction, and a 5 GB model never fits.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane.placement import Device
from tests.fake_agent import write_fake_model
from tests.harness import (
    Api,
    app_state,
    instance_pid,
    load,
    make_settings,
    mark_measured,
    pid_alive,
    serve,
    wait_gone,
    wait_status,
)

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]
GB = 1_000_000_000
HOST_BYTES = 4 * GB
USABLE_BYTES = Device("cpu", HOST_BYTES).usable_bytes  # 3.6 GB

# name → (declared size, fake behaviour); every agent reports its declared size as its memory,
# so observations never move the benchmark figure.
MODELS: dict[str, tuple[int, dict[str, Any]]] = {
    "fake/a": (GB, {"mode": "ok"}),
    "fake/b": (GB, {"mode": "ok"}),
    "fake/c": (GB, {"mode": "ok"}),
    "fake/d": (GB, {"mode": "ok"}),
    # A request takes 120 s: it stays in flight for the whole test (cancelled at the end).
    "fake/slow": (GB, {"mode": "slow", "delay_s": 1.0, "tokens": 120}),
    # 4 s a request: 50 arrive long before the first of them ends.
    "fake/queue": (GB, {"mode": "slow", "delay_s": 0.2, "tokens": 20}),
    "fake/big": (3 * GB, {"mode": "ok"}),
    "fake/huge": (5 * GB, {"mode": "ok"}),
    "fake/x2": (2 * GB, {"mode": "ok"}),
    "fake/y2": (2 * GB, {"mode": "ok"}),
    "fake/x": (1_200_000_000, {"mode": "ok"}),
    "fake/y": (1_200_000_000, {"mode": "ok"}),
    **{f"fake/s{i}": (GB, {"mode": "ok"}) for i in range(6)},
    "fake/unmeasured": (GB, {"mode": "ok"}),
}


def admission_settings(db_dsn: str, data_dir: Path, models: Path) -> Any:
    return make_settings(
        db_dsn,
        data_dir,
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        start_timeout_s=30.0,
        include_packaged_models=False,
        host_memory_bytes=HOST_BYTES,
        use_gpus=False,
        max_queue=8,
    )


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for name, (size, behaviour) in MODELS.items():
        write_fake_model(root, name, mem_bytes=size, **behaviour)
    return root


@pytest.fixture
async def aapi(db_dsn: str, tmp_path: Path, models_dir: Path) -> AsyncIterator[Api]:
    settings = admission_settings(db_dsn, tmp_path / "data", models_dir)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for name, (size, _) in MODELS.items():
            if name != "fake/unmeasured":
                await mark_measured(api, name, size)
        yield api


async def post_load(api: Api, model: str, **extra: Any) -> tuple[int, Any, str | None]:
    """POST /model/load; the status, the body and the Retry-After header."""
    async with api.session.post(
        api.base + "/model/load", json={"model": model, **extra}, headers=api.headers()
    ) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def load_running(api: Api, *models: str) -> None:
    """Load each model and wait until it runs, one after the other (so LRU order is known)."""
    for model in models:
        await load(api, model)
        await wait_status(api, model, "RUNNING", timeout_s=60)


async def history(api: Api, model: str) -> list[dict[str, Any]]:
    status, body = await api.call("POST", "/model/status", {"model": model})
    assert status == 200, body
    return body["history"]  # type: ignore[no-any-return]


def evicted_for(events: list[dict[str, Any]], newcomer: str) -> bool:
    return any(
        e["to"] == "STOPPING" and e["reason"] == f"evicted to make room for {newcomer}"
        for e in events
    )


async def test_unbenchmarked_is_409_and_benchmark_true_queues_then_loads(aapi: Api) -> None:
    status, body = await aapi.call("POST", "/model/load", {"model": "fake/unmeasured"})
    assert status == 409 and body["code"] == "not_benchmarked", body
    assert "/model/job" in body["error"]

    status, body = await aapi.call(
        "POST", "/model/load", {"model": "fake/unmeasured", "benchmark": True, "concurrency": 2}
    )
    assert status == 202, body
    assert body["status"] == "queued" and body["concurrency"] == 2
    pool = app_state(aapi).pool
    pending = await pool.fetchrow("SELECT * FROM pending_loads WHERE model = 'fake/unmeasured'")
    assert pending is not None and pending["concurrency"] == 2
    job = await pool.fetchval("SELECT count(*) FROM model_jobs WHERE model = 'fake/unmeasured'")
    assert job == 1
    assert await pool.fetchval("SELECT count(*) FROM instances") == 0

    # The benchmarker measures through the configured agent command (the fake, which reports
    # its declared size), then the pending load starts the instance on its own.
    running = await wait_status(aapi, "fake/unmeasured", "RUNNING", timeout_s=120)
    assert running["concurrency"] == 2
    status, job = await aapi.call("POST", "/model/job", {"model": "fake/unmeasured"})
    assert status == 200 and job["message"] == "Model available", job
    assert await pool.fetchval("SELECT count(*) FROM pending_loads") == 0
    row = await pool.fetchrow("SELECT device, reserved_bytes FROM instances")
    # Its reservation comes from the measured profile at concurrency 2, margin included.
    assert row["device"] == "cpu" and GB <= row["reserved_bytes"] < 1.1 * GB


async def test_fits_on_cpu_with_its_reservation(aapi: Api) -> None:
    body = await load(aapi, "fake/a", concurrency=2)
    assert body["status"] == "started" and body["instanceStatus"] == "STARTING"
    assert body["device"] == "cpu" and body["reservedBytes"] == GB
    await wait_status(aapi, "fake/a", "RUNNING")
    status, cap = await aapi.call("GET", "/capacity")
    assert status == 200, cap
    [cpu] = cap["devices"]
    assert cpu["totalBytes"] == HOST_BYTES and cpu["usableBytes"] == USABLE_BYTES
    assert cpu["reservedBytes"] == GB
    assert [i["model"] for i in cpu["instances"]] == ["fake/a"]


async def test_reservation_follows_the_profile_and_observed_corrections(aapi: Api) -> None:
    pool = app_state(aapi).pool
    phases = [
        {"concurrency": 1, "peakRssBytes": 500_000_000, "tokens": 8, "seconds": 1.0},
        {"concurrency": 4, "peakRssBytes": 800_000_000, "tokens": 32, "seconds": 1.0},
    ]
    await pool.execute(
        "INSERT INTO model_profiles (model, device_kind, required_ram_bytes, load_s, phases)"
        " VALUES ('fake/a', 'cpu', 505000000, 1.0, $1)",
        phases,
    )
    await mark_measured(aapi, "fake/a", 505_000_000)

    async def planned(concurrency: int) -> int:
        status, plan = await aapi.call(
            "POST", "/model/load", {"model": "fake/a", "dryRun": True, "concurrency": concurrency}
        )
        assert status == 200, plan
        return plan["requiredBytes"]  # type: ignore[no-any-return]

    assert await planned(1) == 505_000_000
    assert await planned(4) == 808_000_000  # the measured peak at 4, plus the 1% margin
    # A running instance was seen at 700 MB at concurrency 1: the catalog figure rose
    # (queries.record_model_observation), and reservations follow it.
    await mark_measured(aapi, "fake/a", 700_000_000)
    assert await planned(1) == 700_000_000
    assert await planned(4) == 808_000_000


async def test_too_large_ever_is_422_at_once_and_evicts_nothing(aapi: Api) -> None:
    await load_running(aapi, "fake/a")
    status, body, _ = await post_load(aapi, "fake/huge")
    assert status == 422 and body["code"] == "insufficient_memory", body
    assert "fake/huge" in body["error"]
    await wait_status(aapi, "fake/a", "RUNNING")
    assert not evicted_for(await history(aapi, "fake/a"), "fake/huge")
    assert await app_state(aapi).pool.fetchval("SELECT count(*) FROM instances") == 1


async def test_full_host_evicts_the_least_recently_used_idle_instance(aapi: Api) -> None:
    await load_running(aapi, "fake/a", "fake/b", "fake/c")
    # a was loaded first, but a request makes it the most recently used: b is now the oldest.
    status, out = await aapi.call("POST", "/model/run", {"model": "fake/a", "prompt": "hi"})
    assert status == 200, out
    b_pid = await instance_pid(aapi, "fake/b")

    body = await load(aapi, "fake/d")
    assert body["instanceStatus"] == "STARTING" and body["reservedBytes"] == GB
    # The newcomer's process starts only once the victim's is gone: never both at once.
    pool = app_state(aapi).pool
    for _ in range(1200):
        d = await pool.fetchrow("SELECT state, handle FROM instances WHERE model = 'fake/d'")
        assert not (d["handle"] and pid_alive(b_pid)), "fake/d started beside its victim"
        if d["state"] != "STARTING":
            break
        await asyncio.sleep(0.02)
    await wait_status(aapi, "fake/d", "RUNNING", timeout_s=60)
    stopped = await wait_status(aapi, "fake/b", "STOPPED")
    assert stopped["reason"] == "evicted to make room for fake/d"
    assert evicted_for(stopped["history"], "fake/d")
    assert [e["to"] for e in stopped["history"]] == ["RUNNING", "STOPPING", "STOPPED"]
    assert stopped["metrics"]["evicted"] is True and stopped["metrics"]["evictions"] == 1
    await wait_gone(b_pid)
    for survivor in ("fake/a", "fake/c"):
        await wait_status(aapi, survivor, "RUNNING")
        assert not evicted_for(await history(aapi, survivor), "fake/d")


async def test_racing_loads_of_one_model_evict_only_for_the_one_instance(aapi: Api) -> None:
    await load_running(aapi, "fake/a", "fake/b", "fake/c")
    answers = await asyncio.gather(*(post_load(aapi, "fake/d") for _ in range(4)))
    assert [a[0] for a in answers] == [200] * 4, answers
    await wait_status(aapi, "fake/d", "RUNNING", timeout_s=60)
    await wait_status(aapi, "fake/a", "STOPPED")
    # The losers of the race are repeats: they evict nothing more.
    for model in ("fake/b", "fake/c"):
        await wait_status(aapi, model, "RUNNING")
        assert not evicted_for(await history(aapi, model), "fake/d")
    pool = app_state(aapi).pool
    assert await pool.fetchval("SELECT count(*) FROM instances WHERE model = 'fake/d'") == 1


async def test_busy_instance_is_never_evicted_and_503_when_nothing_idle_can_go(
    aapi: Api,
) -> None:
    state = app_state(aapi)
    await load_running(aapi, "fake/slow", "fake/a", "fake/b")
    busy = asyncio.ensure_future(
        aapi.call("POST", "/model/run", {"model": "fake/slow", "prompt": "x"})
    )
    try:
        route = state.supervisor.route("fake/slow")
        assert route is not None
        for _ in range(200):
            if state.activity.in_flight(route.instance_id) == 1:
                break
            await asyncio.sleep(0.05)
        assert state.activity.in_flight(route.instance_id) == 1
        slow_pid = await instance_pid(aapi, "fake/slow")

        # fake/slow is the least recently used, but busy: the plan takes fake/a.
        status, plan = await aapi.call("POST", "/model/load", {"model": "fake/d", "dryRun": True})
        assert status == 200, plan
        assert plan["decision"] == "evict"
        assert [e["model"] for e in plan["evictions"]] == ["fake/a"]

        # 3 GB would need fake/slow gone too: nothing idle can make room.
        status, body, retry_after = await post_load(aapi, "fake/big")
        assert status == 503 and body["code"] == "capacity_full", body
        assert retry_after is not None and int(retry_after) >= 1
        for model in ("fake/slow", "fake/a", "fake/b"):
            await wait_status(aapi, model, "RUNNING")
            assert not evicted_for(await history(aapi, model), "fake/big")

        await load(aapi, "fake/d")
        await wait_status(aapi, "fake/d", "RUNNING", timeout_s=60)
        stopped = await wait_status(aapi, "fake/a", "STOPPED")
        assert stopped["reason"] == "evicted to make room for fake/d"
        slow = await wait_status(aapi, "fake/slow", "RUNNING")
        assert [e["to"] for e in slow["history"]] == ["RUNNING"]
        assert pid_alive(slow_pid)
        assert not busy.done()  # the request in flight was never disturbed
    finally:
        busy.cancel()


async def test_dry_run_returns_the_plan_and_changes_nothing(aapi: Api) -> None:
    pool = app_state(aapi).pool
    status, plan = await aapi.call("POST", "/model/load", {"model": "fake/a", "dryRun": True})
    assert status == 200, plan
    assert plan["dryRun"] is True and plan["decision"] == "fits" and plan["device"] == "cpu"
    assert plan["requiredBytes"] == GB and plan["headroomBytes"] == USABLE_BYTES - GB
    assert plan["evictions"] == []
    assert await pool.fetchval("SELECT count(*) FROM instances") == 0

    await load_running(aapi, "fake/a", "fake/b", "fake/c")
    before = await pool.fetch("SELECT id, state, reason FROM instances ORDER BY id")
    events = await pool.fetchval("SELECT count(*) FROM instance_events")

    status, plan = await aapi.call("POST", "/model/load", {"model": "fake/d", "dryRun": True})
    assert status == 200, plan
    assert plan["decision"] == "evict" and plan["device"] == "cpu"
    assert [e["model"] for e in plan["evictions"]] == ["fake/a"]
    assert plan["evictions"][0]["reservedBytes"] == GB
    assert plan["headroomBytes"] == USABLE_BYTES - 3 * GB
    status, plan = await aapi.call("POST", "/model/load", {"model": "fake/big", "dryRun": True})
    assert status == 200 and plan["decision"] == "evict", plan
    assert [e["model"] for e in plan["evictions"]] == ["fake/a", "fake/b", "fake/c"]
    status, plan = await aapi.call("POST", "/model/load", {"model": "fake/huge", "dryRun": True})
    assert status == 200 and plan["decision"] == "never_fits", plan
    status, plan = await aapi.call(
        "POST", "/model/load", {"model": "fake/unmeasured", "dryRun": True}
    )
    assert status == 409 and plan["code"] == "not_benchmarked", plan

    await asyncio.sleep(0.5)  # anything a plan had set in motion would show by now
    assert await pool.fetch("SELECT id, state, reason FROM instances ORDER BY id") == before
    assert await pool.fetchval("SELECT count(*) FROM instance_events") == events
    for model in ("fake/a", "fake/b", "fake/c"):
        await wait_status(aapi, model, "RUNNING")


@pytest.mark.timeout(300)
async def test_fifty_requests_at_concurrency_two_and_queue_eight(aapi: Api) -> None:
    await load(aapi, "fake/queue", concurrency=2)
    await wait_status(aapi, "fake/queue", "RUNNING", timeout_s=60)
    route = app_state(aapi).supervisor.route("fake/queue")
    assert route is not None
    finished: list[int] = []  # statuses in the order the answers arrived

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, Any, str | None]:
        body = {"model": "fake/queue", "prompt": f"p{i}"}
        async with session.post(aapi.base + "/model/run", json=body, headers=aapi.headers()) as r:
            out = (r.status, await r.json(), r.headers.get("Retry-After"))
        finished.append(r.status)
        return out

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=240)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(
            *(one(session, i) for i in range(50)), return_exceptions=True
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []  # no connection resets, no timeouts
    answers = [r for r in results if not isinstance(r, BaseException)]
    served = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] == 503]
    assert len(served) == 10 and len(refused) == 40, sorted(a[0] for a in answers)
    assert all(a[1]["output"].startswith("echo: p") for a in served)
    assert all(a[1]["code"] == "instance_busy" and a[2] is not None for a in refused)
    # Refusals are immediate: every one arrived before the first served answer (4 s each).
    assert finished[:40] == [503] * 40

    # The bound is the agent's: it admitted exactly 10 (2 running + 8 queued).
    async with aapi.session.get(route.endpoint + "/health") as resp:
        health = await resp.json()
    assert health["stats"]["requests"] == 10 and health["maxQueue"] == 8
    status = await wait_status(aapi, "fake/queue", "RUNNING")
    assert status["inferences"] == 10
    # The metrics admission and later issues use.
    assert status["metrics"]["rejected"] == 40 and status["metrics"]["inFlight"] == 0
    assert status["metrics"]["evicted"] is False and status["metrics"]["evictions"] == 0


class Overbooking:
    """Samples the instances table while two control planes race; records every violation."""

    def __init__(self, api: Api) -> None:
        self.pool = app_state(api).pool
        self.violations: list[str] = []
        self.samples = 0

    async def sample(self) -> None:
        rows = await self.pool.fetch("SELECT model, state, reserved_bytes, handle FROM instances")
        self.samples += 1
        admitted = sum(r["reserved_bytes"] for r in rows if r["state"] in ("STARTING", "RUNNING"))
        alive = [r for r in rows if r["handle"] and pid_alive(int(r["handle"]))]
        alive_bytes = sum(r["reserved_bytes"] for r in alive)
        if admitted > USABLE_BYTES:
            self.violations.append(f"admitted {admitted} > {USABLE_BYTES}: {rows}")
        if alive_bytes > USABLE_BYTES:
            self.violations.append(f"running processes hold {alive_bytes}: {alive}")

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            await asyncio.sleep(0.02)


async def settled(api: Api, timeout_s: float = 60) -> None:
    """Wait until no instance is STARTING or STOPPING."""
    pool = app_state(api).pool
    for _ in range(int(timeout_s / 0.1)):
        moving = await pool.fetchval(
            "SELECT count(*) FROM instances WHERE state IN ('STARTING', 'STOPPING')"
        )
        if moving == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("instances still starting or stopping")


@pytest.mark.timeout(300)
async def test_two_control_planes_loading_at_once_never_overbook(
    db_dsn: str, tmp_path: Path, models_dir: Path
) -> None:
    s1 = admission_settings(db_dsn, tmp_path / "data1", models_dir)
    s2 = admission_settings(db_dsn, tmp_path / "data2", models_dir)
    async with (
        serve(s1) as base1,
        serve(s2) as base2,
        aiohttp.ClientSession() as session,
    ):
        cp1, cp2 = Api(base1, session, s1), Api(base2, session, s2)
        for name, (size, _) in MODELS.items():
            await mark_measured(cp1, name, size)
        watch = Overbooking(cp1)
        stop = asyncio.Event()
        sampler = asyncio.ensure_future(watch.run(stop))
        try:
            # 1. Two 2 GB models on an empty 3.6 GB host: one loads, the other is refused (the
            # winner is STARTING, which is never evicted).
            r1, r2 = await asyncio.gather(post_load(cp1, "fake/x2"), post_load(cp2, "fake/y2"))
            statuses = sorted([r1[0], r2[0]])
            assert statuses == [200, 503], (r1, r2)
            loser = r1 if r1[0] == 503 else r2
            assert loser[1]["code"] == "capacity_full" and loser[2] is not None
            winner = "fake/x2" if r1[0] == 200 else "fake/y2"
            await wait_status(cp1, winner, "RUNNING", timeout_s=60)
            status, _ = await cp2.call("POST", "/model/delete", {"model": winner})
            assert status == 200
            await wait_status(cp1, winner, "STOPPED")

            # 2. Three idle 1 GB instances (started from both nodes), then 1.2 GB from each
            # node at once: the first evicts one, the second the other two; both load.
            await load_running(cp1, "fake/a")
            await load_running(cp2, "fake/b")
            await load_running(cp1, "fake/c")
            r1, r2 = await asyncio.gather(post_load(cp1, "fake/x"), post_load(cp2, "fake/y"))
            assert (r1[0], r2[0]) == (200, 200), (r1, r2)
            await wait_status(cp1, "fake/x", "RUNNING", timeout_s=60)
            await wait_status(cp2, "fake/y", "RUNNING", timeout_s=60)
            for victim in ("fake/a", "fake/b", "fake/c"):
                stopped = await wait_status(cp1, victim, "STOPPED")
                assert stopped["reason"] in (
                    "evicted to make room for fake/x",
                    "evicted to make room for fake/y",
                ), stopped

            # 3. Six 1 GB models at once, three through each node, beside the two 1.2 GB ones.
            loads = [post_load(cp1 if i % 2 else cp2, f"fake/s{i}") for i in range(6)]
            answers = await asyncio.gather(*loads)
            assert all(a[0] in (200, 503) for a in answers), answers
            assert all(a[1]["code"] == "capacity_full" for a in answers if a[0] == 503)
            assert any(a[0] == 200 for a in answers), answers
            await settled(cp1)  # every start and eviction done, sampled all along
        finally:
            stop.set()
            await sampler
        assert watch.samples > 10
        assert watch.violations == []


async def test_raising_concurrency_is_admitted_like_a_new_load(aapi: Api) -> None:
    pool = app_state(aapi).pool
    phases = [
        {"concurrency": 1, "peakRssBytes": GB, "tokens": 8, "seconds": 1.0},
        {"concurrency": 4, "peakRssBytes": 2 * GB, "tokens": 32, "seconds": 1.0},
    ]
    await pool.execute(
        "INSERT INTO model_profiles (model, device_kind, required_ram_bytes, load_s, phases)"
        " VALUES ('fake/a', 'cpu', $1, 1.0, $2)",
        GB,
        phases,
    )
    first = await load(aapi, "fake/a")
    await wait_status(aapi, "fake/a", "RUNNING")
    await load_running(aapi, "fake/b")  # 1 GB idle, evictable
    # 1.01 GB + 1 GB held of 3.6: growing fake/a to 2.02 GB evicts nothing.
    grown = await load(aapi, "fake/a", concurrency=4)
    assert grown["reservedBytes"] > first["reservedBytes"] and grown["concurrency"] == 4
    assert (await wait_status(aapi, "fake/b", "RUNNING"))["status"] == "RUNNING"
    # A third instance leaves no room for fake/a to grow again unless an idle one goes.
    await load_running(aapi, "fake/c")
    await pool.execute(
        "UPDATE model_profiles SET phases = $1 WHERE model = 'fake/a'",
        [*phases, {"concurrency": 8, "peakRssBytes": 3 * GB, "tokens": 64, "seconds": 1.0}],
    )
    await load(aapi, "fake/a", concurrency=8)
    statuses = {
        m: await wait_status(aapi, m, "RUNNING" if m == "fake/a" else "STOPPED")
        for m in ("fake/a", "fake/b")
    }
    assert statuses["fake/b"]["reason"] == "evicted to make room for fake/a"
    # At 64 the extrapolated batch needs ~17 GB: never on this host, and it keeps running as is.
    status, huge, _ = await post_load(aapi, "fake/a", concurrency=64)
    assert status == 422 and huge["code"] == "insufficient_memory", huge
    assert (await wait_status(aapi, "fake/a", "RUNNING"))["concurrency"] == 8


async def test_loaded_model_dry_run_and_pending_load_plan_and_reserve_growth(aapi: Api) -> None:
    """A loaded model's dry run shows the real plan; a pending load that grows it reserves."""
    from control_plane.pending_loads import load_pending

    pool = app_state(aapi).pool
    phases = [
        {"concurrency": 1, "peakRssBytes": 1_000_000_000, "tokens": 8, "seconds": 1.0},
        {"concurrency": 4, "peakRssBytes": 2_000_000_000, "tokens": 32, "seconds": 1.0},
    ]
    await pool.execute(
        "INSERT INTO model_profiles (model, device_kind, required_ram_bytes, load_s, phases)"
        " VALUES ('fake/a', 'cpu', $2, 1.0, $1)",
        phases,
        GB,
    )
    await load_running(aapi, "fake/a", "fake/b", "fake/c")
    reserved = "SELECT reserved_bytes FROM instances WHERE model = 'fake/a'"
    before = await pool.fetchval(reserved)

    status, plan = await aapi.call(
        "POST", "/model/load", {"model": "fake/a", "dryRun": True, "concurrency": 1}
    )
    assert status == 200 and plan["decision"] == "loaded" and plan["loaded"] is True, plan
    status, plan = await aapi.call(
        "POST", "/model/load", {"model": "fake/a", "dryRun": True, "concurrency": 4}
    )
    # 2.02 GB at concurrency 4 beside 2 GB of others: 3.6 GB usable, so the idlest must go.
    assert status == 200 and plan["decision"] == "evict", plan
    assert [e["model"] for e in plan["evictions"]] == ["fake/b"]
    assert await pool.fetchval(reserved) == before  # a dry run changes nothing

    await pool.execute(
        "INSERT INTO pending_loads (model, concurrency, expiration_s) VALUES ('fake/a', 4, 300)"
    )
    await load_pending(app_state(aapi))
    row = await pool.fetchrow(
        "SELECT concurrency, reserved_bytes FROM instances WHERE model = 'fake/a'"
    )
    assert row["concurrency"] == 4 and row["reserved_bytes"] == 2_020_000_000
    body = await wait_status(aapi, "fake/b", "STOPPED")
    assert "evicted to make room for fake/a" in body["reason"]
