"""The fast lane (control_plane/fast_lane.py): the routes that run models, served by uvicorn's
protocol straight to their endpoints, keep HTTP/1.1's and the API's contract.

Every other integration test of /model/run, /v1 and /chat goes through the lane too; these
check what the lane itself takes over from Starlette and uvicorn's cycle: keep-alive,
pipelining in order, `Connection: close` and HTTP/1.0, 100-continue, the error handlers, the
request metrics, a client that leaves, and an endpoint that fails.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httptools
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_plane import fast_lane
from control_plane.app import create_app
from control_plane.metrics import ROUTES
from control_plane.routes import api_calls, instances
from tests.fake_agent import write_fake_model
from tests.harness import (
    ADMIN_KEY,
    Api,
    app_state,
    load,
    make_settings,
    mark_measured,
    serve,
    wait_status,
)

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]
OK = "fake/ok"
SLOW = "fake/slow"


@pytest.fixture
async def lapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    models = tmp_path / "models"
    write_fake_model(models, OK, "ok", delay_s=0.0)
    # 20 tokens 0.2 s apart: a 4 s answer.
    write_fake_model(models, SLOW, "slow", delay_s=0.2, tokens=20)
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        model_dirs=str(models),
        agent_command=FAKE_AGENT,
        include_packaged_models=False,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for model in (OK, SLOW):
            await mark_measured(api, model, 50_000_000)
        yield api


async def _running(api: Api, model: str) -> None:
    await load(api, model)
    await wait_status(api, model, "RUNNING")


def _address(api: Api) -> tuple[str, int]:
    host, port = api.base.removeprefix("http://").split(":")
    return host, int(port)


def _post(path: str, body: Any, *, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST %s HTTP/%s\r\nHost: x\r\nAuthorization: Key %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
        % (path.encode(), version, ADMIN_KEY.encode(), len(data), extra)
    ) + data


class Answers:
    """HTTP/1.1 responses parsed off one connection, in order."""

    def __init__(self) -> None:
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._body = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._headers, self._body = {}, b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, self._body))


async def _read_answers(
    reader: asyncio.StreamReader, count: int, timeout_s: float = 10
) -> tuple[Answers, bool]:
    """`count` answers, and whether the server then closed the connection."""
    answers = Answers()
    async with asyncio.timeout(timeout_s):
        while len(answers.done) < count:
            data = await reader.read(65536)
            assert data, f"closed after {len(answers.done)} answers"
            answers.parser.feed_data(data)
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.5) == b""
        except TimeoutError:
            closed = False
    return answers, closed


async def test_the_lane_takes_the_routes_that_run_models_and_nothing_else(
    settings: Any,
) -> None:
    app = create_app(settings)
    handlers: Any = {Exception: object()}
    lane = fast_lane.FastLane(app.routes, handlers, None, api_calls.routes)
    assert set(lane.endpoints) == set(ROUTES)
    assert lane.endpoint_for({"method": "POST", "path": "/model/run"}) is not None
    assert lane.endpoint_for({"method": "GET", "path": "/model/run"}) is None
    assert lane.endpoint_for({"method": "POST", "path": "/model/load"}) is None
    # A deployed API's paths, by shape, with their parameters, as the router would give them.
    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/sentiment"}
    assert lane.endpoint_for(scope) is api_calls.one_segment
    assert scope["path_params"] == {"api": "sentiment"}
    scope = {"type": "http", "method": "POST", "path": "/alice/sentiment"}
    assert lane.endpoint_for(scope) is api_calls.two_segments
    assert scope["path_params"] == {"owner": "alice", "api": "sentiment"}
    # Paths whose first segment is another route's stay with the router (a 405, a 404...).
    for path in ("/health", "/usage", "/model/nope", "/apis/x", "/v1/models", "/a/b/c"):
        assert lane.endpoint_for({"type": "http", "method": "POST", "path": path}) is None, path
    assert lane.endpoint_for({"type": "http", "method": "GET", "path": "/alice/x"}) is None
    with pytest.raises(ValueError):
        fast_lane.FastLane(app.routes, {}, None, api_calls.routes)
    # Without the API routes given as such, a route starting with a parameter is refused.
    with pytest.raises(ValueError):
        fast_lane.FastLane(app.routes, handlers, None)


async def test_pipelined_requests_are_answered_in_order_on_one_connection(lapi: Api) -> None:
    await _running(lapi, SLOW)
    await _running(lapi, OK)
    reader, writer = await asyncio.open_connection(*_address(lapi))
    # A 4 s run, a fast one, a route off the lane, and a fast one again, in one write: each
    # waits for the one before it, whichever finishes first upstream.
    writer.write(
        _post("/model/run", {"model": SLOW, "prompt": "a"})
        + _post("/model/run", {"model": OK, "prompt": "b"})
        + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        + _post("/model/run", {"model": OK, "prompt": "c"})
    )
    answers, closed = await _read_answers(reader, 4)
    writer.close()
    statuses = [status for status, _, _ in answers.done]
    assert statuses == [200, 200, 200, 200], answers.done
    bodies = [json.loads(body) for _, _, body in answers.done]
    assert bodies[0]["tokens_generated"] == 20
    assert "output" in bodies[1] and "output" in bodies[3]
    assert bodies[2]["status"] == "ok"
    for _, headers, body in answers.done:
        assert headers[b"content-length"] == str(len(body)).encode()
        assert b"date" in headers
    assert not closed


async def test_connection_close_and_http_1_0_end_the_connection(lapi: Api) -> None:
    await _running(lapi, OK)
    for extra, version in ((b"Connection: close\r\n", b"1.1"), (b"", b"1.0")):
        reader, writer = await asyncio.open_connection(*_address(lapi))
        request = _post("/model/run", {"model": OK, "prompt": "x"}, extra=extra, version=version)
        writer.write(request)
        answers, closed = await _read_answers(reader, 1)
        writer.close()
        status, headers, _ = answers.done[0]
        assert status == 200
        assert headers[b"connection"] == b"close"
        assert closed, version


async def test_expect_100_continue_is_answered_before_the_body_is_sent(lapi: Api) -> None:
    await _running(lapi, OK)
    reader, writer = await asyncio.open_connection(*_address(lapi))
    body = json.dumps({"model": OK, "prompt": "x"}).encode()
    writer.write(
        b"POST /model/run HTTP/1.1\r\nHost: x\r\nAuthorization: Key %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
        % (ADMIN_KEY.encode(), len(body))
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
    writer.write(body)
    answers, _ = await _read_answers(reader, 1)
    writer.close()
    assert answers.done[0][0] == 200


async def test_errors_on_the_lane_keep_their_envelopes(lapi: Api) -> None:
    status, body = await lapi.call("POST", "/model/run", {"model": OK, "prompt": "x"}, key=None)
    assert (status, body["code"]) == (401, "unauthorized"), body
    status, body = await lapi.call("POST", "/model/run", data="{not json")
    assert status == 400 and body["code"] == "invalid_json", body
    status, body = await lapi.call("POST", "/model/run", {"model": "fake/nope", "prompt": "x"})
    assert status == 404, body
    status, body = await lapi.call("POST", "/model/run", {"model": OK, "prompt": "x"})
    assert status == 404 and body["code"] == "not_loaded", body
    # Off the lane: Starlette's router answers a method the route does not take.
    status, body = await lapi.call("GET", "/model/run")
    assert status == 405 and body["code"], body
    # The OpenAI routes answer in OpenAI's envelope on the lane too.
    status, body = await lapi.call(
        "POST", "/v1/chat/completions", {"model": OK, "messages": "hi"}, key=None
    )
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}, body


async def test_requests_on_the_lane_are_counted_in_metrics(lapi: Api) -> None:
    await _running(lapi, OK)
    for _ in range(3):
        status, _ = await lapi.call("POST", "/model/run", {"model": OK, "prompt": "x"})
        assert status == 200
    status, _ = await lapi.call("POST", "/model/run", {"model": OK, "prompt": "x"}, key="nope")
    assert status == 401
    status, text = await lapi.call("GET", "/metrics")
    assert status == 200
    counted = {
        (s.labels["model"], s.labels["route"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "mlcp_requests"
        for s in family.samples
        if s.name == "mlcp_requests_total"
    }
    assert counted[(OK, "/model/run", "200")] == 3
    assert counted[("unknown", "/model/run", "401")] == 1


async def test_a_client_that_leaves_frees_the_request_on_the_lane(lapi: Api) -> None:
    await _running(lapi, SLOW)
    state = app_state(lapi)
    route = state.supervisor.route(SLOW)
    assert route is not None
    _, writer = await asyncio.open_connection(*_address(lapi))
    writer.write(_post("/model/run", {"model": SLOW, "prompt": "x"}))
    for _ in range(100):
        if state.activity.in_flight(route.instance_id):
            break
        await asyncio.sleep(0.02)
    assert state.activity.in_flight(route.instance_id) == 1
    writer.close()
    started = time.monotonic()
    for _ in range(150):
        if not state.activity.in_flight(route.instance_id):
            break
        await asyncio.sleep(0.02)
    # Freed long before the 4 s answer would have ended.
    assert state.activity.in_flight(route.instance_id) == 0
    assert time.monotonic() - started < 2
    _, text = await lapi.call("GET", "/metrics")
    assert f'model="{SLOW}",node=' in text or f'model="{SLOW}"' in text
    assert 'status="499"' in text


async def test_an_endpoint_that_fails_answers_500_in_the_envelope(
    lapi: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(raw: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(instances, "parse_run_request", broken)
    status, body = await lapi.call("POST", "/model/run", {"model": OK, "prompt": "x"})
    assert status == 500, body
    assert set(body) == {"error", "code"} and "secret" not in body["error"], body
    assert "unexpected error on POST /model/run" in caplog.text
    # The connection and the server go on.
    status, body = await lapi.call("GET", "/health")
    assert status == 200
