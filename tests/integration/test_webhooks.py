"""Webhooks: signed deliveries to a receiver on loopback, retried with backoff, recorded in the
database, restricted to allowed hosts, and never in the way of the worker.

The receiver is a real uvicorn server; it checks each signature itself with the Standard
Webhooks recipe (not with mlcp's own code), so a wrong signature fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import webhooks
from instance_agent.launch import free_loopback_port
from tests.fake_agent import write_fake_model
from tests.harness import Api, app_state, make_settings, mark_measured, serve

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]


@dataclass
class Receiver:
    """What the receiver got, and how it answers: `statuses` in turn (then 200), `delay_s`."""

    base: str = ""
    got: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()

    async def hook(request: Request) -> Response:
        body = await request.body()
        rec.got.append({"headers": dict(request.headers), "body": body, "at": time.monotonic()})
        rec.arrived.set()
        if rec.delay_s:
            await asyncio.sleep(rec.delay_s)
        status = rec.statuses.pop(0) if rec.statuses else 200
        return JSONResponse({"ok": status == 200}, status_code=status)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    port = free_loopback_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.02)
    rec.base = f"http://127.0.0.1:{port}"
    yield rec
    server.should_exit = True
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def wapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    models = tmp_path / "models"
    write_fake_model(models, "fake/ok", mode="ok", delay_s=0.01)
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        start_timeout_s=4.0,
        include_packaged_models=False,
        async_workers=2,
        webhook_backoff_s=0.5,
        webhook_timeout_s=1.0,
        webhook_max_attempts=3,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        await mark_measured(api, "fake/ok", 50_000_000)
        yield api


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks verification, written out from the spec."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1)[1] for s in headers["webhook-signature"].split() if "," in s]
    return any(hmac.compare_digest(expected, g) for g in given)


async def submit(api: Api, hook: str, events: list[str] | None = None, prompt: str = "hi") -> str:
    body: dict[str, Any] = {"input": {"prompt": prompt}, "webhook": hook}
    if events is not None:
        body["webhook_events_filter"] = events
    status, answer = await api.call("POST", "/v1/async/fake/ok", body)
    assert status == 202, answer
    return str(answer["response"]["id"])


async def wait_for(predicate: Any, timeout_s: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_finished_request_is_delivered_signed(wapi: Api, receiver: Receiver) -> None:
    rid = await submit(wapi, receiver.base + "/hook", ["processing", "success"])

    async def two() -> bool:
        return len(receiver.got) >= 2

    await wait_for(two)
    status, secret = await wapi.call("GET", "/v1/webhooks/default/secret")
    assert status == 200 and secret["key"].startswith("whsec_")
    events = []
    for got in receiver.got:
        assert verify(secret["key"], got["headers"], got["body"]), got
        assert abs(int(got["headers"]["webhook-timestamp"]) - time.time()) < 60
        event = json.loads(got["body"])
        assert event["data"]["id"] == rid
        events.append(event["type"])
    assert events == ["async_request.processing", "async_request.success"]
    final = json.loads(receiver.got[-1]["body"])["data"]
    assert final["status"] == "success" and final["result"]["text"] == "echo: hi"
    # A tampered body does not verify with the same headers.
    assert not verify(secret["key"], receiver.got[-1]["headers"], receiver.got[-1]["body"] + b" ")

    async def recorded() -> bool:
        _, body = await wapi.call("GET", f"/v1/async/requests/{rid}/webhooks")
        return [d["state"] for d in body["deliveries"]] == ["delivered", "delivered"]

    await wait_for(recorded)
    _, polled = await wapi.call("GET", f"/v1/async/requests/{rid}")
    assert polled["webhook"] == {
        "url": receiver.base + "/hook",
        "events": ["processing", "success"],
    }


async def test_a_failing_receiver_is_retried_with_backoff_then_given_up(
    wapi: Api, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    rid = await submit(wapi, receiver.base + "/hook")

    async def delivered() -> bool:
        _, body = await wapi.call("GET", f"/v1/async/requests/{rid}/webhooks")
        return bool(body["deliveries"]) and body["deliveries"][0]["state"] == "delivered"

    await wait_for(delivered)
    assert len(receiver.got) == 3
    gaps = [b["at"] - a["at"] for a, b in zip(receiver.got, receiver.got[1:], strict=False)]
    # backoff 0.5 s, then 1 s (found by a sender polling every 0.2 s).
    assert 0.45 <= gaps[0] < 0.95 <= gaps[1], gaps
    # The same delivery each time (one webhook-id), signed afresh.
    assert len({g["headers"]["webhook-id"] for g in receiver.got}) == 1
    _, body = await wapi.call("GET", f"/v1/async/requests/{rid}/webhooks")
    assert body["deliveries"][0]["attempts"] == 3 and body["deliveries"][0]["last_status"] == 200

    # Always failing: given up after webhook_max_attempts (3), with the last reason kept.
    receiver.got.clear()
    receiver.statuses = [500] * 10
    rid = await submit(wapi, receiver.base + "/hook", prompt="again")

    async def failed() -> bool:
        _, body = await wapi.call("GET", f"/v1/async/requests/{rid}/webhooks")
        return bool(body["deliveries"]) and body["deliveries"][0]["state"] == "failed"

    await wait_for(failed)
    _, body = await wapi.call("GET", f"/v1/async/requests/{rid}/webhooks")
    only = body["deliveries"][0]
    assert only["attempts"] == 3 and only["last_status"] == 500 and "500" in only["last_error"]
    await asyncio.sleep(1.0)
    assert len(receiver.got) == 3


async def test_a_hanging_receiver_does_not_hold_up_requests(wapi: Api, receiver: Receiver) -> None:
    receiver.delay_s = 5.0  # beyond webhook_timeout_s (1 s)
    first = await submit(wapi, receiver.base + "/hook", prompt="one")
    await asyncio.wait_for(receiver.arrived.wait(), 20)
    # While the delivery hangs, other requests run to success.
    t0 = time.monotonic()
    second = await submit(wapi, receiver.base + "/hook", prompt="two")
    third_status, third = await wapi.call("POST", "/v1/async/fake/ok", {"input": {"prompt": "3"}})
    assert third_status == 202
    for rid in (second, third["response"]["id"]):

        async def done(rid: str = rid) -> bool:
            _, body = await wapi.call("GET", f"/v1/async/requests/{rid}")
            return bool(body["status"] == "success")

        await wait_for(done, 10)
    assert time.monotonic() - t0 < 5.0
    _, first_body = await wapi.call("GET", f"/v1/async/requests/{first}")
    assert first_body["status"] == "success"

    async def timed_out() -> bool:
        _, body = await wapi.call("GET", f"/v1/async/requests/{first}/webhooks")
        d = body["deliveries"][0]
        return bool(d["attempts"] >= 1 and d["last_error"] and "no answer" in d["last_error"])

    await wait_for(timed_out, 10)


@pytest.mark.parametrize(
    "hook",
    [
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://example.com/hook",
        "https://[2001:db8::1]/x",
        "ftp://127.0.0.1/x",
        "http://user:pw@127.0.0.1/x",
        "http://127.0.0.1:99999/x",
        "not a url",
        "",
        12,
        ["http://127.0.0.1/x"],
        "http://127.0.0.1/" + "x" * 3000,
    ],
)
async def test_a_webhook_to_a_host_not_allowed_is_refused(wapi: Api, hook: Any) -> None:
    status, body = await wapi.call(
        "POST", "/v1/async/fake/ok", {"input": {"prompt": "x"}, "webhook": hook}
    )
    assert status == 422 and body["code"] == "invalid_webhook", (hook, body)
    assert await app_state(wapi).pool.fetchval("SELECT count(*) FROM async_requests") == 0


@pytest.mark.parametrize(
    "events",
    [[], ["done"], "success", [1], ["success", None]],
)
async def test_a_bad_event_filter_is_refused(wapi: Api, events: Any) -> None:
    status, body = await wapi.call(
        "POST",
        "/v1/async/fake/ok",
        {
            "input": {"prompt": "x"},
            "webhook": "http://127.0.0.1:9/x",
            "webhook_events_filter": events,
        },
    )
    assert status == 422 and body["code"] == "invalid_webhook", (events, body)
    status, body = await wapi.call(
        "POST",
        "/v1/async/fake/ok",
        {"input": {"prompt": "x"}, "webhook_events_filter": ["success"]},
    )
    assert status == 422 and body["code"] == "invalid_webhook"


def test_the_allow_list() -> None:
    allow = webhooks.parse_allow("127.0.0.1, ::1, localhost, 10.1.0.0/16, hooks.internal")
    ok = [
        "http://127.0.0.1:8000/x",
        "http://[::1]/x",
        "http://LOCALHOST/x",
        "https://10.1.200.3/x",
        "https://hooks.internal/x",
    ]
    for url in ok:
        assert webhooks.url_problem(url, allow) is None, url
    for url in ["http://127.0.0.2/x", "http://10.2.0.1/x", "http://hooks.internal.evil/x"]:
        assert webhooks.url_problem(url, allow) is not None, url
    assert [webhooks.backoff_s(n, 1.0) for n in (1, 2, 3, 20)] == [1.0, 2.0, 4.0, 300.0]
    assert webhooks.outcome(3, 3, False) == "failed" and webhooks.outcome(2, 3, False) == "pending"
