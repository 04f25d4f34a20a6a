"""Two control planes on one database (issue 17, defect 1): one's reconciler adopting an
instance the other is still launching must not make the launcher kill it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from control_plane.reconciler import reconcile
from tests.fake_agent import write_fake_model
from tests.faults.scenario import control_plane
from tests.harness import Api, app_state, instance_pid, load, pid_alive, wait_gone, wait_status

pytestmark = pytest.mark.faults

MODELS = {f"fake/race-{i}": {"mode": "ok", "delay_s": 0.005} for i in range(3)}


async def test_an_adopted_launch_is_not_killed(db_dsn: str, tmp_path: Path) -> None:
    async with (
        control_plane(db_dsn, tmp_path / "a", MODELS) as a,
        control_plane(db_dsn, tmp_path / "b", MODELS) as b,
    ):
        other = app_state(b).supervisor
        for model in MODELS:
            await load(a, model, expirationPeriodSeconds=300)

        async def all_running() -> bool:
            rows = await app_state(a).pool.fetch("SELECT state FROM instances")
            return len(rows) == len(MODELS) and all(r["state"] == "RUNNING" for r in rows)

        # B's reconciler runs again and again while A launches: it adopts A's STARTING
        # instances and races A to mark them RUNNING.
        for _ in range(200):
            await reconcile(other, datetime.now(UTC))
            if await all_running():
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # a kill would have landed by now
        rows = await app_state(a).pool.fetch("SELECT model, state FROM instances ORDER BY model")
        assert [(r["model"], r["state"]) for r in rows] == [(m, "RUNNING") for m in MODELS]
        for model in MODELS:
            assert pid_alive(await instance_pid(a, model)), f"{model}'s agent was killed"
            for api in (a, b):
                status, body = await api.call("POST", "/model/run", {"model": model, "prompt": "x"})
                assert status == 200, (model, body)
            await wait_status(b, model, "RUNNING")


RACED = "fake/raced"


async def transitions(api: Api, model: str) -> list[tuple[str | None, str]]:
    rows = await app_state(api).pool.fetch(
        "SELECT e.from_state, e.to_state FROM instance_events e JOIN instances i "
        "ON i.id = e.instance_id WHERE i.model = $1 ORDER BY e.id",
        model,
    )
    return [(r["from_state"], r["to_state"]) for r in rows]


async def test_racing_loads_deletes_and_reaping(db_dsn: str, tmp_path: Path) -> None:
    models = {RACED: {"mode": "ok", "delay_s": 0.005}}
    async with (
        control_plane(db_dsn, tmp_path / "a", models) as a,
        control_plane(db_dsn, tmp_path / "b", models) as b,
    ):
        # Both load at once: one instance, and both answers are about it.
        body = {"model": RACED, "expirationPeriodSeconds": 2}
        answers = await asyncio.gather(
            a.call("POST", "/model/load", body), b.call("POST", "/model/load", body)
        )
        assert [s for s, _ in answers] == [200, 200], answers
        await wait_status(a, RACED, "RUNNING")
        pid = await instance_pid(a, RACED)
        count = await app_state(a).pool.fetchval(
            "SELECT count(*) FROM instances WHERE model = $1", RACED
        )
        assert count == 1
        # Both reapers see it expire (2 s idle): it is stopped once.
        await wait_status(b, RACED, "STOPPED", timeout_s=20)
        await wait_gone(pid)
        moves = await transitions(a, RACED)
        assert moves.count(("RUNNING", "STOPPING")) == 1, moves
        assert [to for _, to in moves].count("STOPPED") == 1, moves

        # Load again, then both delete at once: stopped once, both answers say so.
        body = {"model": RACED, "expirationPeriodSeconds": 300}
        assert (await a.call("POST", "/model/load", body))[0] == 200
        await wait_status(b, RACED, "RUNNING")
        pid = await instance_pid(a, RACED)
        deleted = await asyncio.gather(
            a.call("POST", "/model/delete", {"model": RACED}),
            b.call("POST", "/model/delete", {"model": RACED}),
        )
        assert all(s in (200, 409) for s, _ in deleted), deleted
        assert any(s == 200 for s, _ in deleted), deleted
        await wait_status(a, RACED, "STOPPED", timeout_s=20)
        await wait_gone(pid)
        moves = await transitions(a, RACED)
        assert moves.count(("RUNNING", "STOPPING")) == 2, moves  # one per instance
        assert [to for _, to in moves].count("STOPPED") == 2, moves


async def test_racing_benchmark_jobs_measure_each_model_once(db_dsn: str, tmp_path: Path) -> None:
    """Both control planes run a benchmark worker; both are asked for the same jobs at once."""
    folder = tmp_path / "shared-models"
    models = [f"fake/job-race-{i}" for i in range(3)]
    for name in models:
        write_fake_model(folder, name, mode="ok", mem_bytes=40_000_000)
    shared = {"model_dirs": str(folder)}
    async with (
        control_plane(db_dsn, tmp_path / "a", {}, **shared) as a,
        control_plane(db_dsn, tmp_path / "b", {}, **shared) as b,
    ):
        answers = await asyncio.gather(
            *(api.call("POST", "/model/job", {"model": m}) for m in models for api in (a, b, a, b))
        )
        assert all(status == 200 and body["success"] for status, body in answers), answers
        for model in models:
            for api in (a, b):
                deadline = asyncio.get_running_loop().time() + 120
                while True:
                    status, body = await api.call("POST", "/model/job", {"model": model})
                    assert status == 200 and body["success"], body
                    if body["message"] == "Model available":
                        break
                    assert asyncio.get_running_loop().time() < deadline, body
                    await asyncio.sleep(0.2)
        pool = app_state(a).pool
        jobs = await pool.fetch(
            "SELECT model, state, attempts FROM model_jobs ORDER BY model, id", timeout=10
        )
        # One job per model, measured once, by one of the two workers.
        assert [(j["model"], j["state"], j["attempts"]) for j in jobs] == [
            (m, "available", 1) for m in models
        ]
        assert await pool.fetchval("SELECT count(*) FROM model_profiles") == len(models)
        listed = {m["name"]: m for m in (await b.call("GET", "/model/list"))[1]}
        assert all(listed[m]["benchmarked"] for m in models)
