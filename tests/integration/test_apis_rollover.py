"""Redeploying a handler API rolls its instance over (issue 11), with real processes.

Where memory allows, the new version's instance starts beside the old one, which serves every
call until the new one is RUNNING; then the route switches and the old one drains and stops: a
client calling through the switch sees no failed call. Without memory for both, the old one
stops first, and the API's status says so. A control plane SIGKILLed mid rollover leaves a state
the next one finishes: the new version serving, the old one stopped.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import pytest

from control_plane.placement import MARGIN_FRACTION, MARGIN_MIN_BYTES, Device
from control_plane.runtimes.process import LABEL_ENV
from control_plane.settings import Settings
from tests.api_deploy import deploy, wait_api
from tests.e2e.server import Server, start, stop
from tests.harness import ADMIN_KEY, Api, app_state, make_settings, own_control_plane, pid_alive
from tests.harness import serve as serve_here
from tests.integration.test_apis import HANDLER, owner, project, user_key

pytestmark = pytest.mark.timeout(300)

# Each client calls at most this often (bounded load on a shared box) and this many times.
CALL_GAP_S = 0.02
MAX_CALLS = 5_000


@pytest.fixture(scope="module")
async def rolling(
    pg_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    data = tmp_path_factory.mktemp("rollover-data")
    async with own_control_plane(pg_dsn, template_db, data, include_packaged_models=False) as api:
        yield api


async def call(api: Api, key: str, name: str) -> tuple[int, Any]:
    async with api.session.post(
        api.base + f"/{name}", data='"x"', headers=api.headers(key)
    ) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def events(db: Any, instance_id: int) -> dict[str, Any]:
    """When the instance entered each state (the last time)."""
    rows = await db.fetch(
        "SELECT to_state, at FROM instance_events WHERE instance_id = $1 ORDER BY id",
        instance_id,
    )
    return {r["to_state"]: r["at"] for r in rows}


async def test_a_redeploy_rolls_over_without_a_failed_call(rolling: Api, tmp_path: Path) -> None:
    api = rolling
    name = owner()
    key = await user_key(api, name)
    model = f"{name}/roll"
    assert (await deploy(api, project(tmp_path, "roll"), key, name="roll"))[0] == 202
    await wait_api(api, "roll", key, "available")
    status, out = await call(api, key, "roll")
    assert status == 200 and out["version"] == 1, out
    first_pid = out["pid"]
    pool = app_state(api).pool
    first = await pool.fetchrow(
        "SELECT id, api_version FROM instances WHERE model = $1 AND state = 'RUNNING'", model
    )
    assert first["api_version"] == 1

    stop_calls = asyncio.Event()

    async def client() -> list[tuple[int, Any]]:
        seen: list[tuple[int, Any]] = []
        for _ in range(MAX_CALLS):
            if stop_calls.is_set():
                break
            status, body = await call(api, key, "roll")
            seen.append((status, body["version"] if status == 200 else body))
            await asyncio.sleep(CALL_GAP_S)
        return seen

    async def watch() -> list[list[int | None]]:
        """The versions GET /apis/{name} says its live instances run, poll by poll."""
        seen: list[list[int | None]] = []
        while not stop_calls.is_set():
            status, body = await api.call("GET", "/apis/roll", key=key)
            assert status == 200, body
            seen.append([i["apiVersion"] for i in body["instances"]])
            await asyncio.sleep(0.1)
        return seen

    clients = [asyncio.create_task(client()) for _ in range(2)]
    watcher = asyncio.create_task(watch())
    try:
        v2 = project(tmp_path, "roll", version=2)
        assert (await deploy(api, v2, key, name="roll"))[0] == 202
        ready = await wait_api(api, "roll", key, "available", version=2, timeout_s=180)
        await asyncio.sleep(1.0)  # and calls after the switch
    finally:
        stop_calls.set()
        results = await asyncio.gather(*clients)
        listed = await watcher
    # While it rolled over, the API listed both instances, each with its version.
    assert [1, 2] in listed, listed
    assert listed[-1] == [2], listed

    for seen in results:
        assert [s for s in seen if s[0] != 200] == [], "a call failed during the rollover"
        versions = [v for _, v in seen]
        # The old version served until the switch, the new one after it, never back.
        assert versions[0] == 1 and versions[-1] == 2, versions
        assert versions == sorted(versions), versions
    assert "started beside version 1's" in (ready["reason"] or ""), ready
    assert ready["instance"]["status"] == "RUNNING"

    old = await pool.fetchrow("SELECT state, reason FROM instances WHERE id = $1", first["id"])
    assert old["state"] == "STOPPED" and old["reason"] == "replaced by version 2", dict(old)
    assert not pid_alive(first_pid)
    new = await pool.fetchrow(
        "SELECT id, api_version FROM instances WHERE model = $1 AND state = 'RUNNING'", model
    )
    assert new["api_version"] == 2
    # The new one was RUNNING before the old one began to stop.
    old_at, new_at = await events(pool, first["id"]), await events(pool, new["id"])
    assert new_at["RUNNING"] < old_at["STOPPING"], (new_at, old_at)
    # One live instance is left, and deleting the API stops it.
    live = await pool.fetchval(
        "SELECT count(*) FROM instances WHERE model = $1 "
        "AND state IN ('STARTING', 'RUNNING', 'STOPPING')",
        model,
    )
    assert live == 1
    status, out = await call(api, key, "roll")
    assert status == 200 and out["version"] == 2
    assert (await api.call("DELETE", "/apis/roll", key=key))[0] == 200
    assert not pid_alive(out["pid"])


def budget_for(usable: int) -> int:
    """A host memory setting whose usable part (after admission's margin) is `usable`."""
    small = usable + MARGIN_MIN_BYTES
    host = (
        small
        if small * MARGIN_FRACTION <= MARGIN_MIN_BYTES
        else math.ceil(usable / (1 - MARGIN_FRACTION))
    )
    assert abs(Device("cpu", host).usable_bytes - usable) <= 1
    return host


async def test_without_memory_for_both_the_old_instance_stops_first(
    settings: Settings, tmp_path: Path
) -> None:
    # First learn what one instance of the API reserves, then restart the same deployment
    # (the instance is adopted) with memory for one and a half of them.
    roomy = settings.model_copy(update={"stop_instances_on_exit": False})
    async with serve_here(roomy) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, roomy)
        name = owner()
        key = await user_key(api, name)
        assert (await deploy(api, project(tmp_path, "tight"), key, name="tight"))[0] == 202
        await wait_api(api, "tight", key, "available")
        status, out = await call(api, key, "tight")
        assert status == 200 and out["version"] == 1, out
        first_pid = out["pid"]
        first = await app_state(api).pool.fetchrow(
            "SELECT id, reserved_bytes FROM instances WHERE model = $1 AND state = 'RUNNING'",
            f"{name}/tight",
        )
        assert first["reserved_bytes"] > 0
    tight = settings.model_copy(
        update={"host_memory_bytes": budget_for(int(first["reserved_bytes"] * 1.5))}
    )
    async with serve_here(tight) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, tight)
        status, out = await call(api, key, "tight")
        assert status == 200 and out["pid"] == first_pid, out  # adopted, still version 1
        assert (await deploy(api, project(tmp_path, "tight", version=2), key, name="tight"))[
            0
        ] == 202
        ready = await wait_api(api, "tight", key, "available", version=2, timeout_s=180)
        assert "not memory enough for both at once" in (ready["reason"] or ""), ready
        assert "the previous instance was stopped, then this version's started" in ready["reason"]
        status, out = await call(api, key, "tight")
        assert status == 200 and out["version"] == 2 and out["pid"] != first_pid, out
        assert not pid_alive(first_pid)
        pool = app_state(api).pool
        new = await pool.fetchrow(
            "SELECT created_at FROM instances WHERE model = $1 AND state = 'RUNNING'",
            f"{name}/tight",
        )
        old_at = await events(pool, first["id"])
        # Stop, then start: the old one was gone before the new one was admitted.
        assert old_at["STOPPED"] <= new["created_at"], (old_at, new)


# The new version takes this long to import: the window in which its instance is spawned but
# not yet RUNNING, when the control plane is killed.
SLOW_IMPORT_S = 3.0


def labelled_agents(cluster: str) -> list[int]:
    """Process-group leaders labelled as instances of this deployment."""
    found = []
    for proc in psutil.process_iter(["pid", "environ"]):
        try:
            label = (proc.info.get("environ") or {}).get(LABEL_ENV, "")
            if label.startswith(cluster + ":") and os.getpgid(proc.pid) == proc.pid:
                found.append(proc.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def serve_apart(db_dsn: str, root: Path, tag: str) -> Server:
    return start(
        root / "data",
        root,
        tag,
        MLCP_DATABASE_URL=db_dsn,
        MLCP_ADMIN_KEY=ADMIN_KEY,
        MLCP_INCLUDE_PACKAGED_MODELS="false",
        MLCP_GRPC_PORT="0",
        MLCP_STOP_INSTANCES_ON_EXIT="true" if tag == "second" else "false",
    )


async def test_a_control_plane_killed_mid_rollover_leaves_it_for_the_next(
    db_dsn: str, tmp_path: Path
) -> None:
    db = await asyncpg.connect(db_dsn)
    cluster = await db.fetchval("SELECT id FROM cluster")
    servers: list[Server] = []
    model = ""
    try:
        first = serve_apart(db_dsn, tmp_path, "first")
        servers.append(first)
        async with aiohttp.ClientSession() as session:
            api = Api(first.base, session, make_settings(db_dsn, tmp_path / "data"))
            name = owner()
            key = await user_key(api, name)
            model = f"{name}/killed"
            assert (await deploy(api, project(tmp_path, "killed"), key, name="killed"))[0] == 202
            await wait_api(api, "killed", key, "available")
            status, out = await call(api, key, "killed")
            assert status == 200 and out["version"] == 1, out
            first_pid = out["pid"]
            slow = f"import time\ntime.sleep({SLOW_IMPORT_S})\n" + HANDLER.format(version=2)
            v2 = project(tmp_path, "killed", version=2, main=slow)
            assert (await deploy(api, v2, key, name="killed"))[0] == 202
            # Killed once the new version's instance is spawned beside the old, not yet RUNNING.
            deadline = time.monotonic() + 180
            while True:
                spawned = await db.fetchrow(
                    "SELECT id, handle, state FROM instances WHERE model = $1 AND api_version = 2",
                    model,
                )
                if spawned is not None and spawned["handle"] is not None:
                    break
                assert time.monotonic() < deadline, "version 2's instance never spawned"
                await asyncio.sleep(0.05)
            first.proc.kill()
            first.proc.wait(10)
        assert spawned["state"] == "STARTING"
        assert pid_alive(first_pid), "the old instance died with its control plane"

        second = serve_apart(db_dsn, tmp_path, "second")
        servers.append(second)
        async with aiohttp.ClientSession() as session:
            api = Api(second.base, session, make_settings(db_dsn, tmp_path / "data"))
            ready = await wait_api(api, "killed", key, "available", version=2, timeout_s=120)
            assert "rolled over to version 2" in (ready["reason"] or ""), ready
            status, out = await call(api, key, "killed")
            assert status == 200 and out["version"] == 2, out
            # The instance spawned before the kill was adopted, not started again.
            assert str(out["pid"]) == spawned["handle"]
            states = {
                r["api_version"]: r["state"]
                for r in await db.fetch(
                    "SELECT api_version, state FROM instances WHERE model = $1", model
                )
            }
            assert states == {1: "STOPPED", 2: "RUNNING"}, states
            assert not pid_alive(first_pid)
    finally:
        for server in reversed(servers):
            stop(server)
        for pid in labelled_agents(cluster):  # whatever failed, no agent outlives the test
            os.killpg(pid, signal.SIGKILL)
        # Agents forked from a zygote carry its environment, not their label, and the second
        # control plane stops only what it started: version 2's instance was the first one's.
        for row in await db.fetch(
            "SELECT handle FROM instances WHERE model = $1 AND handle IS NOT NULL", model
        ):
            if pid_alive(int(row["handle"])):
                os.killpg(int(row["handle"]), signal.SIGKILL)
        await db.close()
