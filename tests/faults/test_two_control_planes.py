"""Two control planes on one database (issue 17, defect 1): one's reconciler adopting an
instance the other is still launching must not make the launcher kill it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from control_plane.reconciler import reconcile
from tests.faults.scenario import control_plane
from tests.harness import app_state, instance_pid, load, pid_alive, wait_status

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
