"""Slowloris, short bodies, idle-connection floods and oversized headers against a real server
(issue 17, defect 2), and a long stream the receipt deadline must not cut."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.faults.scenario import control_plane
from tests.harness import ADMIN_KEY, Api, load, wait_status

pytestmark = pytest.mark.faults

LIMITS = {
    "request_timeout_s": 1.5,
    "idle_timeout_s": 1.0,
    "max_connections": 40,
    "start_timeout_s": 6.0,
}
STREAMED = "fake/slow-stream"


@pytest.fixture
async def api(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    # 12 tokens 0.25 s apart: a 3 s response, twice the receipt deadline.
    models = {STREAMED: {"mode": "slow", "delay_s": 0.25, "tokens": 12}}
    async with control_plane(db_dsn, tmp_path, models, **LIMITS) as served:
        yield served


def address(api: Api) -> tuple[str, int]:
    host, port = api.base.removeprefix("http://").split(":")
    return host, int(port)


async def read_all(reader: asyncio.StreamReader, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout_s)
    return data, time.monotonic() - started


async def test_slowloris_gets_408_at_the_receipt_deadline(api: Api) -> None:
    reader, writer = await asyncio.open_connection(*address(api))
    started = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")

    async def drip() -> None:
        for _ in range(40):  # one byte each 0.2 s: ~8 s if never stopped
            await asyncio.sleep(0.2)
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                return

    dripping = asyncio.create_task(drip())
    data, _ = await read_all(reader, 5)
    took = time.monotonic() - started
    dripping.cancel()
    writer.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"request_timeout"' in data
    assert 1.4 <= took < 2.5, took


async def test_body_shorter_than_content_length_gets_408(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection(*address(api))
    started = time.monotonic()
    writer.write(
        b"POST /admin/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Key "
        + ADMIN_KEY.encode()
        + b'\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"name":'
    )
    await writer.drain()
    data, _ = await read_all(reader, 5)
    took = time.monotonic() - started
    writer.close()
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert took < 2.5, took
    # Nothing half-received was acted on.
    status, listing = await api.call("GET", "/admin/keys")
    assert status == 200 and len(listing) == 1
    # A client cut off mid-body is not an error of the server's.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_idle_connection_flood(api: Api) -> None:
    host, port = address(api)
    conns = [await asyncio.open_connection(host, port) for _ in range(60)]
    try:
        # Past the cap (40), new connections are answered 503 at once, in the envelope.
        refused = 0
        for reader, _ in conns[45:]:
            data, took = await read_all(reader, 2)
            assert took < 1.0, took
            assert data.startswith(b"HTTP/1.1 503"), data[:200]
            assert b"retry-after: 1" in data.lower() and b'"server_busy"' in data
            refused += 1
        assert refused == 15
        # Silent connections are closed once idle for 1 s; none is held.
        started = time.monotonic()
        for reader, _ in conns[:40]:
            data, _ = await read_all(reader, 4)
            assert data == b""
        assert time.monotonic() - started < 2.5
        # And the server serves again.
        assert (await api.call("GET", "/health", key=None))[0] == 200
    finally:
        for _, writer in conns:
            writer.close()


async def test_oversized_header_gets_431(api: Api) -> None:
    reader, writer = await asyncio.open_connection(*address(api))
    answer = asyncio.create_task(read_all(reader, 5))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    sent = 0
    try:
        while sent < 20 * 1024 * 1024 and not answer.done():
            writer.write(b"a" * 65536)
            await asyncio.wait_for(writer.drain(), 2)
            sent += 65536
            await asyncio.sleep(0.001)
    except (ConnectionError, TimeoutError):
        pass
    data, _ = await answer
    writer.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert b'"headers_too_large"' in data
    assert sent < 4 * 1024 * 1024, f"the client got to send {sent} bytes of headers"
    # 15 KB of headers are fine.
    status, _ = await api.call("GET", "/health", key=None, headers={"X-Pad": "p" * 15_000})
    assert status == 200


async def test_a_long_stream_outlives_the_receipt_deadline(api: Api) -> None:
    await load(api, STREAMED, expirationPeriodSeconds=300)
    await wait_status(api, STREAMED, "RUNNING")
    started = time.monotonic()
    async with api.session.post(
        api.base + "/model/run",
        json={"model": STREAMED, "prompt": "hi", "stream": True},
        headers=api.headers(),
    ) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    assert time.monotonic() - started > 2.5
    assert all(f"tok{i} " in text for i in range(12)), text
    assert "[error" not in text
