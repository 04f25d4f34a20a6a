"""Reconciliation with real fake-agent processes: adoption across restarts, vanished instances,
and labelled orphans."""

from __future__ import annotations

import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import psutil

from control_plane.reconciler import GONE_REASON, reconcile
from control_plane.runtimes.base import InstanceSpec
from tests.fake_agent import write_fake_model
from tests.harness import Api, make_settings, serve
from tests.integration.test_instances import (
    FAKE_AGENT,
    app_state,
    instance_pid,
    load,
    mark_measured,
    wait_gone,
    wait_status,
)


def fake_settings(db_dsn: str, tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    models = tmp_path / "models"
    write_fake_model(models, "fake/ok", "ok")
    values: dict[str, object] = {
        "model_dirs": str(models),
        "agent_command": FAKE_AGENT,
        "start_timeout_s": 10.0,
        "include_packaged_models": False,
    }
    values.update(overrides)
    return make_settings(db_dsn, tmp_path / "data", **values)


async def test_restart_adopts_running_instances(db_dsn: str, tmp_path: Path) -> None:
    settings = fake_settings(db_dsn, tmp_path, stop_instances_on_exit=False)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await mark_measured(api, "fake/ok", 50_000_000)
        await load(api, "fake/ok", expirationPeriodSeconds=600)
        before = await wait_status(api, "fake/ok", "RUNNING")
        pid = await instance_pid(api, "fake/ok")
    assert psutil.pid_exists(pid), "a control-plane restart must not stop instances"

    settings = fake_settings(db_dsn, tmp_path, stop_instances_on_exit=True)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        after = await wait_status(api, "fake/ok", "RUNNING")
        assert after["expiresAt"] == before["expiresAt"] and after["created"] == before["created"]
        status, out = await api.call("POST", "/model/run", {"model": "fake/ok", "prompt": "again"})
        assert status == 200 and out["output"] == "echo: again"
        assert await instance_pid(api, "fake/ok") == pid
        status, _ = await api.call("POST", "/model/delete", {"model": "fake/ok"})
        assert status == 200
    await wait_gone(pid)


async def test_instance_killed_behind_our_back_becomes_failed(db_dsn: str, tmp_path: Path) -> None:
    settings = fake_settings(db_dsn, tmp_path)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await mark_measured(api, "fake/ok", 50_000_000)
        await load(api, "fake/ok")
        await wait_status(api, "fake/ok", "RUNNING")
        os.kill(await instance_pid(api, "fake/ok"), signal.SIGKILL)
        failed = await wait_status(api, "fake/ok", "FAILED", timeout_s=20)
        assert "killed by SIGKILL" in failed["reason"]


async def test_vanished_instance_after_restart_becomes_failed(db_dsn: str, tmp_path: Path) -> None:
    settings = fake_settings(db_dsn, tmp_path, stop_instances_on_exit=False)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await mark_measured(api, "fake/ok", 50_000_000)
        await load(api, "fake/ok")
        await wait_status(api, "fake/ok", "RUNNING")
        pid = await instance_pid(api, "fake/ok")
    os.killpg(pid, signal.SIGKILL)
    await wait_gone(pid)
    async with serve(fake_settings(db_dsn, tmp_path)) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        failed = await wait_status(api, "fake/ok", "FAILED")
        assert failed["reason"] == GONE_REASON


async def test_labelled_orphans_are_stopped(db_dsn: str, tmp_path: Path) -> None:
    settings = fake_settings(db_dsn, tmp_path)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        supervisor = app_state(api).supervisor
        folder = tmp_path / "models" / "fake" / "ok"
        orphan = await supervisor.runtime.start(
            InstanceSpec(9999, 1, "fake/ok", folder, None, concurrency=1, max_queue=1)
        )
        found = await supervisor.runtime.list()
        assert [(x.instance_id, x.handle) for x in found] == [(9999, orphan.handle)]
        decided = await reconcile(supervisor, datetime.now(UTC))
        assert [x.handle for x in decided.remove] == [orphan.handle]
        await wait_gone(int(orphan.handle))
        assert await supervisor.runtime.list() == []


def test_fake_agent_path_exists() -> None:
    assert Path(FAKE_AGENT[1]).is_file() and FAKE_AGENT[0] == sys.executable


async def test_logs_for_admins_and_the_loading_key_only(db_dsn: str, tmp_path: Path) -> None:
    settings = fake_settings(db_dsn, tmp_path)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await mark_measured(api, "fake/ok", 50_000_000)
        _, alice = await api.call("POST", "/admin/keys", {"name": "alice"})
        _, bob = await api.call("POST", "/admin/keys", {"name": "bob"})
        status, _ = await api.call("POST", "/model/load", {"model": "fake/ok"}, key=alice["key"])
        assert status == 200
        await wait_status(api, "fake/ok", "RUNNING")
        async with session.get(
            base + "/model/logs?model=fake/ok&tail=50", headers=api.headers(alice["key"])
        ) as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
        status, body = await api.call("GET", "/model/logs?model=fake/ok", key=bob["key"])
        # Tenancy: another key's instance answers 404, as if it were not there.
        assert status == 404 and body["code"] == "not_loaded"
        status, _ = await api.call("GET", "/model/logs?model=fake/ok")
        assert status == 200
        for query in ("model=../etc/passwd", "model=fake/ok&tail=0", "model=fake/ok&tail=x"):
            status, body = await api.call("GET", "/model/logs?" + query)
            assert status == 422, (query, body)
        status, body = await api.call("GET", "/model/logs?model=fake/none")
        assert status == 404
