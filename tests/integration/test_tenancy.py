"""Tenancy: any key may run a shared RUNNING instance; only its owner or an admin may change it."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fake_agent import write_fake_model
from tests.harness import Api, make_settings, mark_measured, serve, wait_status

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]


@pytest.fixture
async def tapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    models = tmp_path / "models"
    for name in ("fake/a", "fake/b"):
        write_fake_model(models, name, mode="ok", delay_s=0.01)
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        start_timeout_s=10.0,
        include_packaged_models=False,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for name in ("fake/a", "fake/b"):
            await mark_measured(api, name, 50_000_000)
        yield api


async def user_key(api: Api, name: str) -> str:
    status, body = await api.call("POST", "/admin/keys", {"name": name, "scope": "user"})
    assert status == 201, body
    return str(body["key"])


async def test_another_user_can_run_but_not_touch_an_instance(tapi: Api) -> None:
    alice, bob = await user_key(tapi, "alice"), await user_key(tapi, "bob")
    status, body = await tapi.call(
        "POST", "/model/load", {"model": "fake/a", "concurrency": 2}, key=alice
    )
    assert status == 200, body
    await wait_status(tapi, "fake/a", "RUNNING")

    # Bob may run it, see it listed, and read its status.
    status, out = await tapi.call("POST", "/model/run", {"model": "fake/a", "prompt": "x"}, key=bob)
    assert status == 200 and out["output"] == "echo: x"
    status, listed = await tapi.call("GET", "/model/instances", key=bob)
    assert [i["model"] for i in listed] == ["fake/a"]
    assert (await tapi.call("POST", "/model/status", {"model": "fake/a"}, key=bob))[0] == 200
    # Loading it with its current settings answers the shared instance, changing nothing.
    status, body = await tapi.call(
        "POST",
        "/model/load",
        {"model": "fake/a", "concurrency": 2, "expirationPeriodSeconds": 1800},
        key=bob,
    )
    assert status == 200 and body["concurrency"] == 2, body

    # Stopping it, retuning it, reading its logs: 404, as if it were not there.
    for method, path, payload in (
        ("POST", "/model/delete", {"model": "fake/a"}),
        ("POST", "/model/load", {"model": "fake/a", "concurrency": 5}),
        ("POST", "/model/load", {"model": "fake/a", "expirationPeriodSeconds": 60}),
        ("GET", "/model/logs?model=fake/a", None),
    ):
        status, body = await tapi.call(method, path, payload, key=bob)
        assert status == 404 and body["code"] == "not_loaded", (path, payload, body)
    running = await wait_status(tapi, "fake/a", "RUNNING")
    assert running["concurrency"] == 2 and running["expirationPeriodSeconds"] == 1800

    # The owner may do all of it.
    status, text = await tapi.call("GET", "/model/logs?model=fake/a", key=alice)
    assert status == 200, text
    status, body = await tapi.call(
        "POST", "/model/load", {"model": "fake/a", "concurrency": 3}, key=alice
    )
    assert status == 200 and body["concurrency"] == 3, body
    status, body = await tapi.call("POST", "/model/delete", {"model": "fake/a"}, key=alice)
    assert status == 200 and body["status"] == "STOPPED"


async def test_admins_manage_every_instance_and_users_list_their_own(tapi: Api) -> None:
    alice, bob = await user_key(tapi, "alice"), await user_key(tapi, "bob")
    assert (await tapi.call("POST", "/model/load", {"model": "fake/a"}, key=alice))[0] == 200
    assert (await tapi.call("POST", "/model/load", {"model": "fake/b"}, key=bob))[0] == 200
    await wait_status(tapi, "fake/a", "RUNNING")
    await wait_status(tapi, "fake/b", "RUNNING")
    status, listed = await tapi.call("GET", "/model/instances")
    assert sorted(i["model"] for i in listed) == ["fake/a", "fake/b"]
    # The admin stops alice's instance; bob's own stays his to stop.
    status, body = await tapi.call("POST", "/model/delete", {"model": "fake/a"})
    assert status == 200 and body["status"] == "STOPPED"
    status, listed = await tapi.call("GET", "/model/instances", key=alice)
    assert [i["model"] for i in listed] == ["fake/b"]  # shared and RUNNING: alice may run it
    assert (await tapi.call("POST", "/model/delete", {"model": "fake/b"}, key=alice))[0] == 404
    assert (await tapi.call("POST", "/model/delete", {"model": "fake/b"}, key=bob))[0] == 200
