"""Async requests end to end: submit, poll, cancel, list, retention, fairness, burst bound."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane.async_requests import clean_up
from tests.fake_agent import write_fake_model
from tests.harness import Api, app_state, make_settings, mark_measured, serve

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]
MODELS: dict[str, dict[str, Any]] = {
    "fake/ok": {"mode": "ok", "delay_s": 0.01},
    # 3 s a request: long enough to cancel while processing.
    "fake/slow": {"mode": "slow", "delay_s": 0.3, "tokens": 10},
    "fake/load-fail": {"mode": "load_fail"},
}
FINISHED = ("success", "failed", "cancelled")


@pytest.fixture
async def aapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
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
        async_workers=1,
        async_max_queued=4,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for name in MODELS:
            await mark_measured(api, name, 50_000_000)
        yield api


async def submit(api: Api, model: str, prompt: str = "hi", key: str | None = None) -> str:
    kwargs: dict[str, Any] = {} if key is None else {"key": key}
    status, body = await api.call(
        "POST", f"/v1/async/{model}", {"input": {"prompt": prompt}}, **kwargs
    )
    assert status == 202, body
    rid = body["response"]["id"]
    assert body["response"]["urls"]["GET"].endswith(f"/v1/async/requests/{rid}")
    assert body["response"]["urls"]["cancel"].endswith(f"/v1/async/requests/{rid}/cancel")
    return str(rid)


async def poll_until(
    api: Api, rid: str, want: tuple[str, ...], timeout_s: float = 20
) -> tuple[dict[str, Any], list[str]]:
    """Poll until the status is one of `want`; also every distinct status seen, in order."""
    seen: list[str] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    body: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        status, body = await api.call("GET", f"/v1/async/requests/{rid}")
        assert status == 200, body
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        if body["status"] in want:
            return body, seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"{rid} never reached {want}: last {body}")


async def user_key(api: Api, name: str) -> str:
    status, body = await api.call("POST", "/admin/keys", {"name": name})
    assert status in (200, 201), body
    return str(body["key"])


async def test_a_request_loads_its_model_on_demand_and_succeeds(aapi: Api) -> None:
    rid = await submit(aapi, "fake/ok", "hello")
    body, seen = await poll_until(aapi, rid, FINISHED)
    assert body["status"] == "success", body
    assert body["result"]["text"] == "echo: hello" and body["error"] is None
    order = ["accepted", "pending", "processing", "success"]
    assert seen == [s for s in order if s in seen], seen
    stamps = body["timestamps"]
    assert stamps["accepted"] <= stamps["pending"] <= stamps["processing"] <= stamps["finished"]
    # Loaded on demand with the on-demand expiration.
    row = await app_state(aapi).pool.fetchrow(
        "SELECT expiration_s FROM instances WHERE model = 'fake/ok'"
    )
    assert row["expiration_s"] == aapi.settings.on_demand_expiration_s


async def test_a_pending_request_says_why_it_waits(aapi: Api) -> None:
    rid = await submit(aapi, "fake/slow")
    reasons = set()
    for _ in range(200):
        _, body = await aapi.call("GET", f"/v1/async/requests/{rid}")
        if body["status"] == "pending" and body["reason"]:
            reasons.add(body["reason"])
        if body["status"] in ("processing", *FINISHED):
            break
        await asyncio.sleep(0.02)
    assert any("loading" in r for r in reasons), reasons
    await aapi.call("POST", f"/v1/async/requests/{rid}/cancel")


async def test_a_model_that_fails_to_load_fails_the_request_with_the_reason(aapi: Api) -> None:
    rid = await submit(aapi, "fake/load-fail")
    body, _ = await poll_until(aapi, rid, FINISHED, timeout_s=30)
    assert body["status"] == "failed" and body["error"], body


async def test_cancel_in_each_state(aapi: Api) -> None:
    state = app_state(aapi)
    first = await submit(aapi, "fake/slow", "one")
    await poll_until(aapi, first, ("processing",))
    # One worker slot: the second request stays accepted while the first runs.
    second = await submit(aapi, "fake/slow", "two")
    _, body = await aapi.call("GET", f"/v1/async/requests/{second}")
    assert body["status"] == "accepted"
    status, body = await aapi.call("DELETE", f"/v1/async/requests/{second}")
    assert status == 200 and body["status"] == "cancelled"

    instance = await state.pool.fetchval("SELECT id FROM instances WHERE model = 'fake/slow'")
    assert state.activity.in_flight(instance) == 1
    t0 = asyncio.get_running_loop().time()
    status, body = await aapi.call("POST", f"/v1/async/requests/{first}/cancel")
    assert status == 200 and body["status"] == "cancelled" and body["error"]
    # Aborted at the instance within a second: the relay closed the upstream request.
    while state.activity.in_flight(instance) != 0:
        assert asyncio.get_running_loop().time() - t0 < 1.0, "processing request not aborted"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.6)  # a late answer must not overwrite the cancellation
    _, body = await aapi.call("GET", f"/v1/async/requests/{first}")
    assert body["status"] == "cancelled" and body["result"] is None

    status, body = await aapi.call("POST", f"/v1/async/requests/{first}/cancel")
    assert status == 409 and body["code"] == "request_finished"


async def test_a_finished_request_cannot_be_cancelled_and_other_keys_see_nothing(
    aapi: Api,
) -> None:
    rid = await submit(aapi, "fake/ok")
    await poll_until(aapi, rid, ("success",))
    status, body = await aapi.call("DELETE", f"/v1/async/requests/{rid}")
    assert status == 409 and body["code"] == "request_finished"
    other = await user_key(aapi, "bob")
    for method, path in [
        ("GET", f"/v1/async/requests/{rid}"),
        ("DELETE", f"/v1/async/requests/{rid}"),
        ("POST", f"/v1/async/requests/{rid}/cancel"),
        ("GET", f"/v1/async/requests/{uuid.uuid4()}"),
        ("GET", "/v1/async/requests/not-a-uuid"),
    ]:
        status, body = await aapi.call(method, path, key=other)
        assert status == 404 and body["code"] == "request_not_found", (method, path, body)
    status, body = await aapi.call("GET", "/v1/async/requests", key=other)
    assert status == 200 and body["requests"] == []


async def test_a_concurrent_burst_is_stored_together_within_the_bound(aapi: Api) -> None:
    """Submits arriving at once share inserts; the bound and the key's order still hold."""
    results = await asyncio.gather(
        *(
            aapi.call("POST", "/v1/async/fake/slow", {"input": {"prompt": str(i)}})
            for i in range(12)
        )
    )
    codes = [status for status, _ in results]
    assert codes.count(202) == 4 and codes.count(429) == 8, codes
    accepted = {body["response"]["id"] for status, body in results if status == 202}
    rows = await app_state(aapi).pool.fetch("SELECT id, key_rank FROM async_requests")
    assert {str(r["id"]) for r in rows} == accepted, "only the 202s were stored"
    assert sorted(r["key_rank"] for r in rows) == [0, 1, 2, 3]
    for rid in accepted:
        await aapi.call("POST", f"/v1/async/requests/{rid}/cancel")


async def test_a_burst_is_bounded_per_key_and_a_second_key_still_gets_served(aapi: Api) -> None:
    codes = []
    for i in range(8):
        status, body = await aapi.call("POST", "/v1/async/fake/slow", {"input": {"prompt": str(i)}})
        codes.append(status)
        if status == 429:
            assert body["code"] == "too_many_requests"
    assert codes.count(202) == 4 and codes.count(429) == 4, codes
    async with aapi.session.post(
        aapi.base + "/v1/async/fake/slow",
        json={"input": {"prompt": "x"}},
        headers=aapi.headers(),
    ) as resp:
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    # Another key is not bounded by the first one's burst, and its request is claimed next.
    other = await user_key(aapi, "carol")
    theirs = await submit(aapi, "fake/slow", "theirs", key=other)
    # Ahead of the first key's backlog (its first request may be claimed already, or tie).
    ranks = await app_state(aapi).pool.fetch(
        "SELECT id FROM async_requests WHERE (state = 'accepted' AND key_rank >= 1)"
        " OR id = $1::uuid ORDER BY key_rank, created_at",
        theirs,
    )
    assert str(ranks[0]["id"]) == theirs
    for row in await app_state(aapi).pool.fetch("SELECT id, key_id FROM async_requests"):
        await aapi.call("POST", f"/v1/async/requests/{row['id']}/cancel")


async def test_listing_is_newest_first_and_paginated(aapi: Api) -> None:
    ids = [await submit(aapi, "fake/ok", str(i)) for i in range(3)]
    status, page = await aapi.call("GET", "/v1/async/requests?limit=2")
    assert status == 200 and [r["id"] for r in page["requests"]] == ids[::-1][:2]
    assert page["next"] is not None
    path = page["next"][len(aapi.base) :]
    status, page2 = await aapi.call("GET", path)
    assert [r["id"] for r in page2["requests"]] == ids[:1] and page2["next"] is None
    for bad in ("limit=0", "limit=101", "limit=abc", "after=nope"):
        status, body = await aapi.call("GET", f"/v1/async/requests?{bad}")
        assert status == 422, (bad, body)


async def test_finished_requests_are_deleted_after_the_retention_period(aapi: Api) -> None:
    rid = await submit(aapi, "fake/ok")
    await poll_until(aapi, rid, ("success",))
    state = app_state(aapi)
    now = datetime.now(UTC)
    assert await clean_up(state, now) == 0
    later = now + timedelta(seconds=aapi.settings.async_retention_s + 1)
    assert await clean_up(state, later) == 1
    status, _ = await aapi.call("GET", f"/v1/async/requests/{rid}")
    assert status == 404


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/async/fake/none", {"input": {"prompt": "x"}}, 404, "model_not_found"),
        ("/v1/async/bad..id/x", {"input": {"prompt": "x"}}, 422, "invalid_model"),
        ("/v1/async/fake/ok", [], 422, "invalid_body"),
        ("/v1/async/fake/ok", {}, 422, "invalid_field"),
        ("/v1/async/fake/ok", {"input": "x"}, 422, "invalid_field"),
        ("/v1/async/fake/ok", {"input": {}}, 422, "invalid_prompt"),
        ("/v1/async/fake/ok", {"input": {"prompt": 3}}, 422, "invalid_prompt"),
        ("/v1/async/fake/ok", {"input": {"prompt": "x", "params": 1}}, 422, "invalid_params"),
        ("/v1/async/fake/ok", {"input": {"prompt": "x", "x": 1}}, 422, "unknown_field"),
        ("/v1/async/fake/ok", {"input": {"prompt": "x"}, "y": 1}, 422, "unknown_field"),
        ("/v1/async/fake/ok", {"input": {"prompt": "x"}, "URL": "http://x"}, 422, "invalid_field"),
    ],
)
async def test_bad_submissions(aapi: Api, path: str, body: Any, status: int, code: str) -> None:
    got, answer = await aapi.call("POST", path, body)
    assert (got, answer["code"]) == (status, code), answer
    count = await app_state(aapi).pool.fetchval("SELECT count(*) FROM async_requests")
    assert count == 0


async def test_an_unbenchmarked_model_is_refused(aapi: Api) -> None:
    await app_state(aapi).pool.execute(
        "UPDATE models SET required_ram_bytes = NULL WHERE name = 'fake/ok'"
    )
    status, body = await aapi.call("POST", "/v1/async/fake/ok", {"input": {"prompt": "x"}})
    assert status == 409 and body["code"] == "not_benchmarked"
    status, body = await aapi.call(
        "POST", "/v1/async/fake/ok", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert status == 400 and body["code"] == "invalid_json"
    status, body = await aapi.call(
        "POST", "/v1/async/fake/ok", {"input": {"prompt": "x"}}, key=None
    )
    assert status == 401
