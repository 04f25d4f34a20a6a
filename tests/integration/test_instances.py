"""Instances end to end through the control plane, with fake agents in real subprocesses."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane import relay
from control_plane.reaper import reap
from tests.fake_agent import write_fake_model
from tests.harness import (
    Api,
    app_state,
    instance_pid,
    load,
    make_settings,
    mark_measured,
    serve,
    wait_gone,
    wait_status,
)

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]

MODELS: dict[str, dict[str, Any]] = {
    "fake/ok": {"mode": "ok", "delay_s": 0.01},
    "fake/slow": {"mode": "slow", "delay_s": 0.3, "tokens": 10},
    # 7 s a request: longer than the stop grace (5 s), so only draining lets it finish.
    "fake/slower": {"mode": "slow", "delay_s": 0.7, "tokens": 10},
    "fake/load-fail": {"mode": "load_fail"},
    "fake/never-healthy": {"mode": "never_healthy"},
    "fake/crash-mid-stream": {"mode": "crash_mid_stream", "tokens": 6, "delay_s": 0.01},
    "fake/hang-mid-stream": {"mode": "hang_mid_stream", "tokens": 6, "delay_s": 0.01},
    "fake/garbage": {"mode": "garbage", "tokens": 4},
    "fake/crash-on-run": {"mode": "crash_on_run"},
    "fake/dies": {"mode": "exit_after_ready", "exit_after_s": 1.0},
}


@pytest.fixture
async def fapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    models = tmp_path / "models"
    for name, behaviour in MODELS.items():
        write_fake_model(models, name, **behaviour)
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        start_timeout_s=4.0,
        include_packaged_models=False,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for name in MODELS:
            await mark_measured(api, name, 50_000_000)
        yield api


async def test_load_run_status_instances_delete(fapi: Api) -> None:
    started = await load(fapi, "fake/ok", concurrency=2, expirationPeriodSeconds=300)
    assert started["status"] == "started" and started["concurrency"] == 2
    body = await wait_status(fapi, "fake/ok", "RUNNING")
    assert body["expirationPeriodSeconds"] == 300 and body["expirationPeriodMinutes"] == 5
    assert body["expiresAt"].endswith("Z") and body["inferences"] == 0

    status, out = await fapi.call(
        "POST", "/model/run", {"model": "fake/ok", "prompt": "hi", "params": {"max_new_tokens": 3}}
    )
    assert status == 200, out
    assert out["output"] == "echo: hi" and out["error"] is None
    assert {"tokens_generated", "time_seconds", "tokens_per_second"} <= set(out)

    body = await wait_status(fapi, "fake/ok", "RUNNING")
    assert body["inferences"] == 1
    assert [e["to"] for e in body["history"]] == ["RUNNING"]

    status, listed = await fapi.call("GET", "/model/instances")
    assert status == 200 and [i["model"] for i in listed] == ["fake/ok"]

    pid = await instance_pid(fapi, "fake/ok")
    status, deleted = await fapi.call("POST", "/model/delete", {"model": "fake/ok"})
    assert status == 200 and deleted["status"] == "STOPPED"
    assert deleted["reason"] == "deleted by request"
    await wait_gone(pid)
    status, out = await fapi.call("POST", "/model/run", {"model": "fake/ok", "prompt": "x"})
    assert status == 404 and out["code"] == "not_loaded"
    status, listed = await fapi.call("POST", "/model/instances")
    assert listed == []


async def test_load_is_idempotent_and_updates_settings(fapi: Api) -> None:
    await load(fapi, "fake/ok")
    first = await wait_status(fapi, "fake/ok", "RUNNING")
    again = await load(fapi, "fake/ok", concurrency=3, expirationPeriodSeconds=60)
    assert again["concurrency"] == 3 and again["expirationPeriodSeconds"] == 60
    body = await wait_status(fapi, "fake/ok", "RUNNING")
    assert body["created"] == first["created"] and body["concurrency"] == 3
    count = await app_state(fapi).pool.fetchval("SELECT count(*) FROM instances")
    assert count == 1


async def test_stream_plain_text_and_sse(fapi: Api) -> None:
    await load(fapi, "fake/slow")
    await wait_status(fapi, "fake/slow", "RUNNING")
    body = {"model": "fake/slow", "prompt": "Once", "stream": True}
    async with fapi.session.post(
        fapi.base + "/model/run", json=body, headers=fapi.headers()
    ) as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        chunks = [c async for c in resp.content.iter_any()]
    text = b"".join(chunks).decode()
    assert text == "".join(f"tok{i} " for i in range(10))
    assert len(chunks) > 1  # it arrived as it was generated, not at once

    headers = {**fapi.headers(), "Accept": "text/event-stream"}
    async with fapi.session.post(fapi.base + "/model/run", json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    assert "data: tok0 " in raw and "event: done" in raw
    body_status = await wait_status(fapi, "fake/slow", "RUNNING")
    assert body_status["inferences"] == 2


async def test_sse_streams_ping_while_the_instance_is_silent(
    fapi: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `: ping` comment every PING_S keeps a silent stream open; events stay whole."""
    monkeypatch.setattr(relay, "PING_S", 0.1)
    await load(fapi, "fake/slow")
    await wait_status(fapi, "fake/slow", "RUNNING")
    headers = {**fapi.headers(), "Accept": "text/event-stream"}
    body = {"model": "fake/slow", "prompt": "x", "stream": True}
    async with fapi.session.post(fapi.base + "/model/run", json=body, headers=headers) as resp:
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["X-Accel-Buffering"] == "no"
        raw = (await resp.read()).decode()
    blocks = raw.split("\r\n\r\n")
    assert blocks[-1] == "", raw
    pings = [b for b in blocks if b == ": ping"]
    assert len(pings) >= 5, raw  # ~3 s of tokens 0.3 s apart
    data = [b.removeprefix("data: ") for b in blocks if b.startswith("data: ")]
    assert "".join(data) == "".join(f"tok{i} " for i in range(10)), raw
    assert any(b.startswith("event: done\r\ndata: {") for b in blocks), raw


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("fake/load-fail", "load failed: the fake model refuses to load"),
        ("fake/never-healthy", "did not become healthy within 4 s"),
    ],
)
async def test_start_failures_are_visible(fapi: Api, model: str, reason: str) -> None:
    await load(fapi, model)
    body = await wait_status(fapi, model, "FAILED")
    assert reason in body["reason"]
    status, out = await fapi.call("POST", "/model/run", {"model": model, "prompt": "x"})
    assert status == 404 and out["code"] == "not_loaded" and reason in out["error"]
    listed = await fapi.call("GET", "/model/instances")
    assert listed == (200, [])


async def test_crash_mid_stream_ends_with_error_and_fails_instance(fapi: Api) -> None:
    await load(fapi, "fake/crash-mid-stream")
    await wait_status(fapi, "fake/crash-mid-stream", "RUNNING")
    pid = await instance_pid(fapi, "fake/crash-mid-stream")
    body = {"model": "fake/crash-mid-stream", "prompt": "x", "stream": True}
    async with fapi.session.post(
        fapi.base + "/model/run", json=body, headers=fapi.headers()
    ) as resp:
        text = (await resp.read()).decode()
    assert text.startswith("tok0 tok1 ")
    assert "[error: instance_failed] the model instance failed mid-stream" in text
    status = await wait_status(fapi, "fake/crash-mid-stream", "FAILED")
    assert "exited with code 1" in status["reason"]
    await wait_gone(pid)


async def test_hang_mid_stream_is_detected_and_killed(fapi: Api) -> None:
    await load(fapi, "fake/hang-mid-stream")
    await wait_status(fapi, "fake/hang-mid-stream", "RUNNING")
    pid = await instance_pid(fapi, "fake/hang-mid-stream")
    headers = {**fapi.headers(), "Accept": "text/event-stream"}
    body = {"model": "fake/hang-mid-stream", "prompt": "x", "stream": True}
    async with fapi.session.post(fapi.base + "/model/run", json=body, headers=headers) as resp:
        raw = (await asyncio.wait_for(resp.read(), 30)).decode()
    # Ended by the progress timeout (no health check answered for 5 s), before the kill.
    assert "event: error" in raw and "instance_timeout" in raw, raw
    status = await wait_status(fapi, "fake/hang-mid-stream", "FAILED", timeout_s=30)
    assert "stopped answering health checks" in status["reason"]
    await wait_gone(pid)


async def test_garbage_answers_are_502_not_500(fapi: Api) -> None:
    await load(fapi, "fake/garbage")
    await wait_status(fapi, "fake/garbage", "RUNNING")
    status, out = await fapi.call("POST", "/model/run", {"model": "fake/garbage", "prompt": "x"})
    assert status == 502 and out["code"] == "instance_error"
    body = {"model": "fake/garbage", "prompt": "x", "stream": True}
    async with fapi.session.post(
        fapi.base + "/model/run", json=body, headers=fapi.headers()
    ) as resp:
        text = (await resp.read()).decode()
    assert "[error: instance_error]" in text


async def test_crash_on_run_and_death_after_ready(fapi: Api) -> None:
    await load(fapi, "fake/crash-on-run")
    await load(fapi, "fake/dies")
    await wait_status(fapi, "fake/crash-on-run", "RUNNING")
    status, out = await fapi.call(
        "POST", "/model/run", {"model": "fake/crash-on-run", "prompt": "x"}
    )
    assert status == 502 and out["code"] == "instance_failed"
    failed = await wait_status(fapi, "fake/crash-on-run", "FAILED")
    assert "exited with code 1" in failed["reason"]
    died = await wait_status(fapi, "fake/dies", "FAILED", timeout_s=20)
    assert "exited with code 7" in died["reason"]


async def test_reaper_stops_idle_instances_only(fapi: Api) -> None:
    state = app_state(fapi)
    await load(fapi, "fake/slow", expirationPeriodSeconds=5)
    await load(fapi, "fake/ok", expirationPeriodSeconds=5)
    await wait_status(fapi, "fake/slow", "RUNNING")
    before = await wait_status(fapi, "fake/ok", "RUNNING")
    slow_pid = await instance_pid(fapi, "fake/slow")
    ok_pid = await instance_pid(fapi, "fake/ok")

    # A request in flight on fake/slow (2 s) protects it even when its time is up.
    busy = asyncio.ensure_future(
        fapi.call("POST", "/model/run", {"model": "fake/slow", "prompt": "x"})
    )
    await asyncio.sleep(0.3)
    later = datetime.now(UTC) + timedelta(seconds=6)
    reaped = await reap(state.pool, state.supervisor, state.activity, later)
    assert [r.model for r in reaped] == ["fake/ok"]
    stopped = await wait_status(fapi, "fake/ok", "STOPPED")
    assert stopped["reason"] == "expired after 5 s without requests"
    await wait_gone(ok_pid)

    status, _ = await busy
    assert status == 200
    after_run = await wait_status(fapi, "fake/slow", "RUNNING")
    # The sliding expiry moved forward from the end of the request.
    assert after_run["expiresAt"] > before["expiresAt"]
    reaped = await reap(state.pool, state.supervisor, state.activity, later)
    assert reaped == []  # its expiry slid past `later`
    reaped = await reap(
        state.pool, state.supervisor, state.activity, datetime.now(UTC) + timedelta(seconds=6)
    )
    assert [r.model for r in reaped] == ["fake/slow"]
    await wait_gone(slow_pid)


async def test_client_disconnect_releases_the_request(fapi: Api) -> None:
    state = app_state(fapi)
    await load(fapi, "fake/slow")
    await wait_status(fapi, "fake/slow", "RUNNING")
    route = state.supervisor.route("fake/slow")
    assert route is not None
    port = int(fapi.base.rsplit(":", 1)[1])
    for stream in (False, True):
        payload = (
            '{"model":"fake/slow","prompt":"x","stream":%s}' % ("true" if stream else "false")
        ).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /model/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Key {fapi.headers()['Authorization'][4:]}\r\n".encode()
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        await asyncio.sleep(0.5)
        assert state.activity.in_flight(route.instance_id) == 1
        writer.transport.abort()
        for _ in range(40):
            if state.activity.in_flight(route.instance_id) == 0:
                break
            await asyncio.sleep(0.05)
        assert state.activity.in_flight(route.instance_id) == 0, f"stream={stream}"
        # The agent saw its caller go away too.
        async with fapi.session.get(route.endpoint + "/health") as resp:
            health = await resp.json()
        for _ in range(20):
            if health["inFlight"] == 0:
                break
            await asyncio.sleep(0.05)
            async with fapi.session.get(route.endpoint + "/health") as resp:
                health = await resp.json()
        assert health["inFlight"] == 0, f"stream={stream}"
        _ = reader


async def test_stopping_drains_requests_the_control_plane_did_not_see(fapi: Api) -> None:
    """A request that reached the agent after the instance was judged idle (another control
    plane, before its flush) finishes before the instance is stopped."""
    state = app_state(fapi)
    await load(fapi, "fake/slower", expirationPeriodSeconds=5)
    await wait_status(fapi, "fake/slower", "RUNNING")
    route = state.supervisor.route("fake/slower")
    assert route is not None
    unseen = asyncio.ensure_future(
        fapi.session.post(route.endpoint + "/run", json={"prompt": "late"})
    )
    await asyncio.sleep(0.3)
    later = datetime.now(UTC) + timedelta(seconds=6)
    reaped = await reap(state.pool, state.supervisor, state.activity, later)
    assert [r.model for r in reaped] == ["fake/slower"]
    resp = await unseen
    assert resp.status == 200 and (await resp.json())["output"] == "echo: late"
    resp.release()
    await wait_status(fapi, "fake/slower", "STOPPED")
