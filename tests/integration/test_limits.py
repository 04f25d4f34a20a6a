"""Per-key limits: monthly calls, requests per minute, concurrent streams, instances; `/usage`.

A real control plane over fake agents. Every refusal is a 429 with its own code, `Retry-After`
and the RateLimit-* headers; the key's other requests and other keys go on as before.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fake_agent import write_fake_model
from tests.harness import ADMIN_KEY, Api, make_settings, mark_measured, serve, wait_status

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]
MODELS = {"fake/a": {"mode": "ok"}, "fake/b": {"mode": "ok"}, "fake/slow": {"delay_s": 0.3}}


@pytest.fixture
async def lapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    async with limited_api(db_dsn, tmp_path) as api:
        yield api


@pytest.fixture
async def dapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    """Defaults set: user keys get 2 calls a month and 1 instance unless they say otherwise."""
    async with limited_api(
        db_dsn, tmp_path, default_monthly_calls=2, default_max_instances=1
    ) as api:
        yield api


def limited_api(db_dsn: str, tmp_path: Path, **overrides: Any) -> Any:
    import contextlib

    @contextlib.asynccontextmanager
    async def served() -> AsyncIterator[Api]:
        folder = tmp_path / "models"
        for name, behaviour in MODELS.items():
            write_fake_model(folder, name, **behaviour)
        settings = make_settings(
            db_dsn,
            tmp_path / "data",
            model_dirs=str(folder),
            agent_command=FAKE_AGENT,
            start_timeout_s=10.0,
            include_packaged_models=False,
            **overrides,
        )
        async with serve(settings) as base, aiohttp.ClientSession() as session:
            api = Api(base, session, settings)
            for name in MODELS:
                await mark_measured(api, name, 50_000_000)
            yield api

    return served()


async def new_key(api: Api, name: str, **limits: Any) -> dict[str, Any]:
    status, body = await api.call("POST", "/admin/keys", {"name": name, **limits})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def send(
    api: Api, path: str, body: Any, key: str, method: str = "POST"
) -> tuple[int, Any, Mapping[str, str]]:
    """One request; its status, decoded body and headers."""
    async with api.session.request(
        method, api.base + path, json=body, headers=api.headers(key)
    ) as resp:
        text = await resp.text()
        try:
            payload: Any = json.loads(text)
        except ValueError:
            payload = text
        # Case-insensitive, as header names are.
        return resp.status, payload, resp.headers.copy()


async def running(api: Api, model: str) -> None:
    status, body = await api.call("POST", "/model/load", {"model": model})
    assert status == 200, body
    await wait_status(api, model, "RUNNING")


def run_body(model: str = "fake/a", **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "x", **extra}


async def test_limits_are_set_at_creation_and_changed_by_patch(lapi: Api) -> None:
    alice = await new_key(lapi, "alice", monthlyCalls=1000, requestsPerMinute=60)
    assert alice["limits"] == {
        "monthlyCalls": 1000,
        "requestsPerMinute": 60,
        "concurrentStreams": None,
        "maxApis": None,
        "maxInstances": None,
    }
    assert alice["effectiveLimits"]["concurrentStreams"] == 0  # no default: unlimited
    path = f"/admin/keys/{alice['id']}"
    status, body = await lapi.call(
        "PATCH", path, {"monthlyCalls": None, "maxInstances": 3, "disabled": True}
    )
    assert status == 200, body
    assert body["limits"]["monthlyCalls"] is None and body["limits"]["maxInstances"] == 3
    assert body["limits"]["requestsPerMinute"] == 60 and body["disabled"] is not None
    # A whole-number float is a whole number.
    status, body = await lapi.call("PATCH", path, {"concurrentStreams": 2.0})
    assert status == 200 and body["limits"]["concurrentStreams"] == 2
    listed = {k["id"]: k for k in (await lapi.call("GET", "/admin/keys"))[1]}
    assert listed[alice["id"]]["limits"]["maxInstances"] == 3


async def test_the_monthly_quota_serves_exactly_the_limit(lapi: Api) -> None:
    await running(lapi, "fake/a")
    alice = await new_key(lapi, "alice", monthlyCalls=3)
    bob = await new_key(lapi, "bob")
    for left in (2, 1, 0):
        status, body, headers = await send(lapi, "/model/run", run_body(), alice["key"])
        assert status == 200, body
        assert headers["RateLimit-Limit"] == "3"
        assert headers["RateLimit-Remaining"] == str(left)
        assert int(headers["RateLimit-Reset"]) > 0
    status, body, headers = await send(lapi, "/model/run", run_body(), alice["key"])
    assert status == 429 and body["code"] == "quota_exceeded", body
    assert int(headers["Retry-After"]) >= 1 and headers["RateLimit-Remaining"] == "0"
    assert headers["RateLimit-Limit"] == "3"
    # Streams count too; other requests of the key and other keys go on.
    status, body, _ = await send(lapi, "/model/run", run_body(stream=True), alice["key"])
    assert status == 429 and body["code"] == "quota_exceeded"
    assert (await lapi.call("POST", "/model/status", {"model": "fake/a"}, key=alice["key"]))[
        0
    ] == 200
    assert (await lapi.call("GET", "/model/list", key=alice["key"]))[0] == 200
    status, body, headers = await send(lapi, "/model/run", run_body(), bob["key"])
    assert status == 200 and "RateLimit-Limit" not in headers, headers  # bob has no limits

    status, usage = await lapi.call("GET", "/usage", key=alice["key"])
    assert status == 200 and [(k["id"], k["calls"]) for k in usage["keys"]] == [(alice["id"], 3)]
    assert usage["keys"][0]["monthlyCalls"] == 3 and usage["keys"][0]["remaining"] == 0

    # Raised: served again (a spent key is asked about again after a second).
    assert (await lapi.call("PATCH", f"/admin/keys/{alice['id']}", {"monthlyCalls": 4}))[0] == 200
    await asyncio.sleep(1.1)
    status, body, headers = await send(lapi, "/model/run", run_body(), alice["key"])
    assert status == 200 and headers["RateLimit-Remaining"] == "0", (body, headers)
    # 0 is unlimited.
    assert (await lapi.call("PATCH", f"/admin/keys/{alice['id']}", {"monthlyCalls": 0}))[0] == 200
    for _ in range(3):
        status, body, headers = await send(lapi, "/model/run", run_body(), alice["key"])
        assert status == 200 and "RateLimit-Limit" not in headers


async def test_calls_that_reach_no_instance_are_not_counted(lapi: Api) -> None:
    alice = await new_key(lapi, "alice", monthlyCalls=1)
    for _ in range(3):
        status, body, _ = await send(lapi, "/model/run", run_body("fake/b"), alice["key"])
        assert status == 404 and body["code"] == "not_loaded", body
    await running(lapi, "fake/b")
    assert (await send(lapi, "/model/run", run_body("fake/b"), alice["key"]))[0] == 200
    status, body, _ = await send(lapi, "/model/run", run_body("fake/b"), alice["key"])
    assert status == 429 and body["code"] == "quota_exceeded"


async def test_requests_per_minute(lapi: Api) -> None:
    await running(lapi, "fake/a")
    alice = await new_key(lapi, "alice", requestsPerMinute=2, monthlyCalls=100)
    for left in (1, 0):
        status, _, headers = await send(lapi, "/model/run", run_body(), alice["key"])
        assert status == 200
        # The tighter of the two limits is reported.
        assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == ("2", str(left))
    status, body, headers = await send(lapi, "/model/run", run_body(), alice["key"])
    assert status == 429 and body["code"] == "rate_limited", body
    assert 1 <= int(headers["Retry-After"]) <= 60 and headers["RateLimit-Limit"] == "2"
    # A refused request is not a call.
    usage = (await lapi.call("GET", "/usage", key=alice["key"]))[1]
    assert usage["keys"][0]["calls"] == 2


async def test_concurrent_streams(lapi: Api) -> None:
    await running(lapi, "fake/slow")
    alice = await new_key(lapi, "alice", concurrentStreams=1)
    body = run_body("fake/slow", stream=True)
    async with lapi.session.post(
        lapi.base + "/model/run", json=body, headers=lapi.headers(alice["key"])
    ) as first:
        assert first.status == 200
        status, refused, headers = await send(lapi, "/model/run", body, alice["key"])
        assert status == 429 and refused["code"] == "too_many_streams", refused
        assert headers["Retry-After"] == "1" and headers["RateLimit-Limit"] == "1"
        # Not a stream: not limited by the stream cap.
        assert (await send(lapi, "/model/run", run_body("fake/slow"), alice["key"]))[0] == 200
        assert "tok3" in await first.text()
    # The stream ended: its slot is free again.
    for _ in range(50):
        status, text, _ = await send(lapi, "/model/run", body, alice["key"])
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200 and "tok3" in text


async def test_a_stream_the_client_drops_frees_its_slot(lapi: Api) -> None:
    await running(lapi, "fake/slow")
    alice = await new_key(lapi, "alice", concurrentStreams=1)
    body = run_body("fake/slow", stream=True)
    async with lapi.session.post(
        lapi.base + "/model/run", json=body, headers=lapi.headers(alice["key"])
    ) as first:
        assert first.status == 200
        await first.content.readany()
        first.close()
    for _ in range(50):
        status, _, _ = await send(lapi, "/model/run", body, alice["key"])
        if status == 200:
            break
        await asyncio.sleep(0.05)
    assert status == 200


async def test_instance_limit_at_load(lapi: Api) -> None:
    alice = await new_key(lapi, "alice", maxInstances=1)
    assert (await lapi.call("POST", "/model/load", {"model": "fake/a"}, key=alice["key"]))[0] == 200
    status, body, headers = await send(lapi, "/model/load", {"model": "fake/b"}, alice["key"])
    assert status == 429 and body["code"] == "instance_limit", body
    assert headers["RateLimit-Limit"] == "1" and "Retry-After" in headers
    # Retuning its own instance starts none: allowed.
    status, body = await lapi.call(
        "POST", "/model/load", {"model": "fake/a", "concurrency": 2}, key=alice["key"]
    )
    assert status == 200, body
    # Another key is not limited by alice's instances.
    assert (await lapi.call("POST", "/model/load", {"model": "fake/b"}))[0] == 200
    await wait_status(lapi, "fake/a", "RUNNING")
    assert (await lapi.call("POST", "/model/delete", {"model": "fake/a"}, key=alice["key"]))[
        0
    ] == 200
    assert (await lapi.call("POST", "/model/delete", {"model": "fake/b"}))[0] == 200
    status, body = await lapi.call("POST", "/model/load", {"model": "fake/b"}, key=alice["key"])
    assert status == 200, body


async def test_defaults_apply_to_user_keys_and_zero_is_unlimited(dapi: Api) -> None:
    await running(dapi, "fake/a")
    plain = await new_key(dapi, "plain")
    free = await new_key(dapi, "free", monthlyCalls=0, maxInstances=0)
    assert plain["effectiveLimits"]["monthlyCalls"] == 2 and plain["limits"]["monthlyCalls"] is None
    for _ in range(2):
        assert (await send(dapi, "/model/run", run_body(), plain["key"]))[0] == 200
    status, body, _ = await send(dapi, "/model/run", run_body(), plain["key"])
    assert status == 429 and body["code"] == "quota_exceeded"
    for _ in range(4):
        assert (await send(dapi, "/model/run", run_body(), free["key"]))[0] == 200
        assert (await send(dapi, "/model/run", run_body(), ADMIN_KEY))[0] == 200
    # maxInstances: the default 1 for plain keys; 0 (unlimited) for free.
    assert (await dapi.call("POST", "/model/load", {"model": "fake/b"}, key=plain["key"]))[0] == 200
    status, body = await dapi.call("POST", "/model/load", {"model": "fake/slow"}, key=plain["key"])
    assert status == 429 and body["code"] == "instance_limit"
    status, body = await dapi.call("POST", "/model/load", {"model": "fake/slow"}, key=free["key"])
    assert status == 200, body

    status, usage = await dapi.call("GET", "/usage")
    by_name = {k["name"]: k for k in usage["keys"]}
    assert by_name["plain"]["calls"] == 2 and by_name["plain"]["remaining"] == 0
    assert by_name["free"]["calls"] == 4 and by_name["free"]["remaining"] is None
    # Admin keys take no default.
    assert (
        by_name["bootstrap admin"]["calls"] == 4 and by_name["bootstrap admin"]["monthlyCalls"] == 0
    )
    status, old = await dapi.call("GET", "/usage?month=2001-01")
    assert status == 200 and old["month"] == "2001-01"
    assert all(k["calls"] == 0 for k in old["keys"])


async def test_other_inference_routes_share_the_quota(lapi: Api) -> None:
    await running(lapi, "fake/a")
    alice = await new_key(lapi, "alice", monthlyCalls=5)
    # Streams carry the headers too: server-sent events of /model/run and of /v1.
    async with lapi.session.post(
        lapi.base + "/model/run",
        json=run_body(stream=True),
        headers={**lapi.headers(alice["key"]), "Accept": "text/event-stream"},
    ) as resp:
        assert resp.status == 200 and "text/event-stream" in resp.headers["Content-Type"]
        assert resp.headers["RateLimit-Remaining"] == "4" and "done" in await resp.text()
    async with lapi.session.post(
        lapi.base + "/v1/completions",
        json={"model": "fake/a", "prompt": "x", "max_tokens": 2, "stream": True},
        headers=lapi.headers(alice["key"]),
    ) as resp:
        assert resp.status == 200 and resp.headers["RateLimit-Remaining"] == "3"
        assert "[DONE]" in await resp.text()
    status, body, headers = await send(
        lapi, "/v1/completions", {"model": "fake/a", "prompt": "x", "max_tokens": 2}, alice["key"]
    )
    assert status == 200 and headers["RateLimit-Remaining"] == "2", body
    status, body, headers = await send(
        lapi, "/chat", {"model": "fake/a", "prompt": "x"}, alice["key"]
    )
    assert status == 200 and headers["RateLimit-Remaining"] == "1", body
    status, body, headers = await send(
        lapi, "/v1/async/fake/a", {"input": {"prompt": "x"}}, alice["key"]
    )
    assert status == 202 and headers["RateLimit-Remaining"] == "0", body
    status, body, headers = await send(
        lapi,
        "/v1/chat/completions",
        {"model": "fake/a", "messages": [{"role": "user", "content": "x"}]},
        alice["key"],
    )
    # OpenAI's envelope, with mlcp's code.
    assert status == 429 and body["error"]["code"] == "quota_exceeded", body
    assert headers["RateLimit-Remaining"] == "0"
    status, body, _ = await send(lapi, "/v1/async/fake/a", {"input": {"prompt": "x"}}, alice["key"])
    assert status == 429 and body["code"] == "quota_exceeded", body


BAD_LIMITS = [
    {"monthlyCalls": -1},
    {"monthlyCalls": 10**12},
    {"monthlyCalls": 1.5},
    {"monthlyCalls": "10"},
    {"monthlyCalls": True},
    {"monthlyCalls": [10]},
    {"requestsPerMinute": -5},
    {"requestsPerMinute": 100_001},
    {"concurrentStreams": 10_001},
    {"maxInstances": "many"},
    {"maxApis": 2**64},
    {"maxApis": float("inf")},
    {"maxInstances": {"n": 1}},
]


@pytest.mark.parametrize("limits", BAD_LIMITS)
async def test_bad_limits_are_refused(lapi: Api, limits: dict[str, Any]) -> None:
    # Sent as text: json.dumps writes inf as Infinity, which the server reads as invalid JSON.
    data = json.dumps({"name": "x", **limits})
    status, body = await lapi.call(
        "POST", "/admin/keys", data=data, headers={"content-type": "application/json"}
    )
    assert status in (400, 422) and body["code"] in ("invalid_field", "invalid_json"), body
    alice = await new_key(lapi, "alice")
    status, body = await lapi.call(
        "PATCH",
        f"/admin/keys/{alice['id']}",
        data=json.dumps(limits),
        headers={"content-type": "application/json"},
    )
    assert status in (400, 422) and body["code"] in ("invalid_field", "invalid_json"), body


async def test_limit_changes_by_the_wrong_key_or_of_no_key(lapi: Api) -> None:
    alice = await new_key(lapi, "alice")
    for path in ("/admin/keys/999999", "/admin/keys/abc", "/admin/keys/-1"):
        status, body = await lapi.call("PATCH", path, {"monthlyCalls": 5})
        assert status == 404 and body["code"] == "key_not_found", (path, body)
    status, body = await lapi.call(
        "PATCH", f"/admin/keys/{alice['id']}", {"monthlyCalls": 5}, key=alice["key"]
    )
    assert status == 403 and body["code"] == "forbidden"
    status, body = await lapi.call(
        "POST", "/admin/keys", {"name": "mine", "monthlyCalls": 0}, key=alice["key"]
    )
    assert status == 403
    status, body = await lapi.call("PATCH", f"/admin/keys/{alice['id']}", {"monthlyCall": 5})
    assert status == 422 and body["code"] == "unknown_field"
    # A revoked key's limits cannot be changed.
    assert (await lapi.call("DELETE", f"/admin/keys/{alice['id']}"))[0] == 200
    status, body = await lapi.call("PATCH", f"/admin/keys/{alice['id']}", {"monthlyCalls": 5})
    assert status == 404 and body["code"] == "key_not_found"


@pytest.mark.parametrize(
    "month",
    ["2026-13", "2026-00", "2026-1", "26-01", "abcd-ef", "1999-12", "2026-01-01", "", "2026_01"],
)
async def test_usage_with_a_bad_month(lapi: Api, month: str) -> None:
    status, body = await lapi.call("GET", f"/usage?month={month}")
    assert status == 400 and body["code"] == "invalid_query", body


async def test_usage_needs_a_key_and_shows_users_only_their_own(lapi: Api) -> None:
    assert (await lapi.call("GET", "/usage", key=None))[0] == 401
    alice = await new_key(lapi, "alice")
    await new_key(lapi, "bob")
    status, body = await lapi.call("GET", "/usage?month=%EF%BC%92%EF%BC%90", key=alice["key"])
    assert status == 400
    status, body = await lapi.call("GET", "/usage", key=alice["key"])
    assert status == 200 and [k["name"] for k in body["keys"]] == ["alice"]
    status, body = await lapi.call("GET", "/usage")
    assert {"bootstrap admin", "alice", "bob"} <= {k["name"] for k in body["keys"]}


async def test_an_async_request_loading_beyond_the_instance_limit_fails_saying_why(
    lapi: Api,
) -> None:
    alice = await new_key(lapi, "alice", maxInstances=1)
    assert (await lapi.call("POST", "/model/load", {"model": "fake/a"}, key=alice["key"]))[0] == 200
    await wait_status(lapi, "fake/a", "RUNNING")
    status, body, _ = await send(lapi, "/v1/async/fake/b", {"input": {"prompt": "x"}}, alice["key"])
    assert status == 202, body
    rid = body["response"]["id"]
    for _ in range(100):
        _, got = await lapi.call("GET", f"/v1/async/requests/{rid}", key=alice["key"])
        if got["status"] in ("success", "failed"):
            break
        await asyncio.sleep(0.1)
    assert got["status"] == "failed" and "instances" in got["error"], got
    # Its running model is served as before.
    status, body, _ = await send(lapi, "/v1/async/fake/a", {"input": {"prompt": "x"}}, alice["key"])
    assert status == 202, body
