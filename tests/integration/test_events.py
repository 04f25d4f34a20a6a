"""GET /events: lifecycle events across two control planes on one database, with replay."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fake_agent import write_fake_model
from tests.harness import ADMIN_KEY, Api, app_state, load, make_settings, mark_measured, serve
from tests.harness import wait_status as wait_for_status

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]
GB = 1_000_000_000
MODELS = {"fake/a": GB, "fake/b": GB, "fake/fresh": GB}


def settings_for(db_dsn: str, data_dir: Path, models: Path) -> Any:
    return make_settings(
        db_dsn,
        data_dir,
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        start_timeout_s=10.0,
        include_packaged_models=False,
        # 1.8 GB usable: one 1 GB instance fits, a second evicts the first.
        host_memory_bytes=2 * GB,
        use_gpus=False,
    )


@pytest.fixture
async def two(db_dsn: str, tmp_path: Path) -> AsyncIterator[tuple[Api, Api]]:
    """Two control planes sharing one database."""
    models = tmp_path / "models"
    for name, size in MODELS.items():
        write_fake_model(models, name, mode="ok", mem_bytes=size)
    async with (
        serve(settings_for(db_dsn, tmp_path / "a", models)) as base_a,
        serve(settings_for(db_dsn, tmp_path / "b", models)) as base_b,
        aiohttp.ClientSession() as session,
    ):
        a = Api(base_a, session, settings_for(db_dsn, tmp_path / "a", models))
        b = Api(base_b, session, a.settings)
        for name, size in MODELS.items():
            if name != "fake/fresh":
                await mark_measured(a, name, size)
        for api in (a, b):
            await asyncio.wait_for(app_state(api).events.listening.wait(), 10)
        yield a, b


class Events:
    """An open /events stream, read event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.last_id: str | None = None

    async def next(self, timeout_s: float = 15) -> dict[str, Any]:
        return await asyncio.wait_for(self._next(), timeout_s)

    async def _next(self) -> dict[str, Any]:
        fields: dict[str, str] = {}
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                raise EOFError("the stream ended")
            line = raw.decode().rstrip("\r\n")
            if not line:
                if fields.get("event") == "lifecycle":
                    self.last_id = fields.get("id")
                    event: dict[str, Any] = json.loads(fields["data"])
                    event["_cursor"] = fields.get("id")
                    return event
                fields = {}
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")

    async def until(self, pred: Any, timeout_s: float = 20) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            left = deadline - asyncio.get_running_loop().time()
            event = await self.next(max(left, 0.01))
            seen.append(event)
            if pred(event):
                return seen


async def open_events(
    api: Api, key: str = ADMIN_KEY, query: str = "", headers: dict[str, str] | None = None
) -> Events:
    hdrs = {"Authorization": f"Key {key}", **(headers or {})}
    resp = await api.session.get(api.base + "/events" + query, headers=hdrs)
    assert resp.status == 200, await resp.text()
    assert resp.headers["content-type"].startswith("text/event-stream")
    return Events(resp)


def instance_event(model: str, to: str) -> Any:
    return lambda e: e["model"] == model and e["kind"] in ("instance", "eviction") and e["to"] == to


async def test_a_transition_on_one_control_plane_reaches_subscribers_of_the_other(
    two: tuple[Api, Api],
) -> None:
    a, b = two
    stream = await open_events(b)
    try:
        await load(a, "fake/a")
        seen = await stream.until(instance_event("fake/a", "RUNNING"))
        moves = [(e["from"], e["to"]) for e in seen if e["model"] == "fake/a"]
        assert moves == [(None, "STARTING"), ("STARTING", "RUNNING")]
        assert all(e["kind"] == "instance" and e["instance"] for e in seen)
        assert seen[-1]["reason"] == "healthy" and seen[-1]["at"].endswith("Z")
        # The cursor only grows, and it is what a client resumes from.
        cursors = [int(e["_cursor"]) for e in seen]
        assert cursors == sorted(cursors)

        # An eviction says so, with its reason.
        await load(a, "fake/b")
        seen = await stream.until(instance_event("fake/a", "STOPPING"))
        evicted = seen[-1]
        assert evicted["kind"] == "eviction"
        assert evicted["reason"] == "evicted to make room for fake/b"
        assert app_state(b).events.subscribers == 1
    finally:
        stream.resp.close()
        await wait_for_status(a, "fake/b", "RUNNING", timeout_s=30)


async def test_job_transitions_are_events(two: tuple[Api, Api]) -> None:
    a, b = two
    stream = await open_events(a)
    try:
        status, body = await b.call("POST", "/model/job", {"model": "fake/fresh"})
        assert status == 200, body
        seen = await stream.until(lambda e: e["kind"] == "job" and e["to"] == "available", 60)
        jobs = [(e["from"], e["to"]) for e in seen if e["kind"] == "job"]
        assert jobs[0] == (None, "queued") and ("queued", "benchmarking") in jobs
        assert jobs[-1] == ("benchmarking", "available")
    finally:
        stream.resp.close()


async def test_last_event_id_replays_exactly_what_was_missed(two: tuple[Api, Api]) -> None:
    a, b = two
    stream = await open_events(a)
    await load(a, "fake/a")
    await stream.until(instance_event("fake/a", "STARTING"))
    resume = stream.last_id
    assert resume is not None
    stream.resp.close()
    # While disconnected: it becomes RUNNING, then is stopped.
    await wait_for_status(a, "fake/a", "RUNNING")
    assert (await a.call("POST", "/model/delete", {"model": "fake/a"}))[0] == 200

    again = await open_events(b, headers={"Last-Event-ID": resume}, query="?follow=0")
    missed = []
    with pytest.raises(EOFError):
        while True:
            missed.append(await again.next())
    again.resp.close()
    assert [(e["from"], e["to"]) for e in missed] == [
        ("STARTING", "RUNNING"),
        ("RUNNING", "STOPPING"),
        ("STOPPING", "STOPPED"),
    ]
    assert all(int(e["id"]) > int(resume) for e in missed)

    # ?tail=N replays the newest N; with ?lastEventId= (a browser's first connection) the same.
    tail = await open_events(a, query="?tail=2&follow=0")
    got = [await tail.next(), await tail.next()]
    tail.resp.close()
    assert [e["to"] for e in got] == ["STOPPING", "STOPPED"]
    by_query = await open_events(a, query=f"?lastEventId={resume}&follow=0")
    assert (await by_query.next())["to"] == "RUNNING"
    by_query.resp.close()


async def test_users_see_their_own_instances_and_job_events(two: tuple[Api, Api]) -> None:
    a, _ = two
    status, alice = await a.call("POST", "/admin/keys", {"name": "alice", "scope": "user"})
    assert status == 201
    mine = await open_events(a, key=alice["key"])
    admin = await open_events(a)
    try:
        await load(a, "fake/a")  # loaded by the admin key
        await admin.until(instance_event("fake/a", "RUNNING"))
        status, body = await a.call("POST", "/model/load", {"model": "fake/b"}, key=alice["key"])
        assert status == 200, body
        seen = await mine.until(instance_event("fake/b", "RUNNING"))
        assert {e["model"] for e in seen} == {"fake/b"}  # nothing of the admin's fake/a
        # The eviction of the admin's instance is the admin's event, not alice's.
        await admin.until(lambda e: e["model"] == "fake/a" and e["kind"] == "eviction")
        await b_job(a, alice["key"])
        job = await mine.until(lambda e: e["kind"] == "job")
        assert job[-1]["model"] == "fake/fresh"
    finally:
        mine.resp.close()
        admin.resp.close()


async def b_job(api: Api, key: str) -> None:
    status, body = await api.call("POST", "/model/job", {"model": "fake/fresh"}, key=key)
    assert status == 200, body


@pytest.mark.parametrize(
    ("query", "headers", "status", "code"),
    [
        ("", {"Last-Event-ID": "yesterday"}, 400, "invalid_last_event_id"),
        ("", {"Last-Event-ID": "-5"}, 400, "invalid_last_event_id"),
        ("", {"Last-Event-ID": "9" * 40}, 400, "invalid_last_event_id"),
        ("", {"Last-Event-ID": "\u0663"}, 400, "invalid_last_event_id"),
        ("?lastEventId=1e9", {}, 400, "invalid_last_event_id"),
        ("?tail=abc", {}, 400, "invalid_query"),
        ("?tail=100000", {}, 400, "invalid_query"),
        ("?follow=maybe", {}, 400, "invalid_query"),
    ],
)
async def test_bad_input_is_a_clear_400(
    two: tuple[Api, Api], query: str, headers: dict[str, str], status: int, code: str
) -> None:
    a, _ = two
    got, body = await a.call("GET", "/events" + query, headers=headers)
    assert (got, body["code"]) == (status, code), body


async def test_events_need_a_key(two: tuple[Api, Api]) -> None:
    a, _ = two
    got, body = await a.call("GET", "/events", key=None)
    assert got == 401 and body["code"] == "unauthorized"
    got, body = await a.call("POST", "/events")
    assert got == 405
