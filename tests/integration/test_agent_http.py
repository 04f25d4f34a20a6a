"""The relay's HTTP/1.1 client against real loopback servers that answer as scripted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from control_plane.agent_http import (
    RELEASE_WAIT_S,
    AgentHttp,
    BadAnswer,
    ConnectFailed,
    ConnectionLost,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A raw TCP server: each connection is handled by `handler`; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = asyncio.Event()
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


@contextlib.asynccontextmanager
async def scripted(handler: Callable[[Scripted], Handler]) -> AsyncIterator[tuple[Scripted, str]]:
    box: list[Scripted] = []
    srv = Scripted(lambda r, w: handler(box[0])(r, w))
    box.append(srv)
    server = await asyncio.start_server(srv._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield srv, f"http://127.0.0.1:{port}"
    finally:
        server.close()


def answer(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


@contextlib.asynccontextmanager
async def uvicorn_agent() -> AsyncIterator[str]:
    """A real uvicorn server, as agents are: JSON answers and a chunked stream."""

    async def run(request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"echo": body, "type": request.headers["content-type"]})

    async def stream(request: Request) -> Response:
        count = (await request.json())["n"]

        async def events() -> AsyncIterator[bytes]:
            for i in range(count):
                yield json.dumps({"text": f"t{i} "}).encode() + b"\n"
                await asyncio.sleep(0)
            yield b'{"done": true}\n'

        return StreamingResponse(events(), media_type="application/x-ndjson")

    app = Starlette(
        routes=[Route("/run", run, methods=["POST"]), Route("/stream", stream, methods=["POST"])]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="error", timeout_keep_alive=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


async def test_answers_and_streams_from_uvicorn_reusing_one_connection() -> None:
    http = AgentHttp()
    async with uvicorn_agent() as endpoint:
        for i in range(20):
            resp = await http.post(endpoint, "/run", json.dumps({"i": i}).encode())
            assert resp.status == 200
            assert json.loads(await resp.read()) == {"echo": {"i": i}, "type": "application/json"}
            resp.release()
        assert http.connections() == 1
        resp = await http.post(endpoint, "/stream", b'{"n": 300}')
        data = b""
        while chunk := await resp.readany(5.0):
            data += chunk
        resp.release()
        lines = [json.loads(line) for line in data.splitlines()]
        assert [e["text"] for e in lines[:-1]] == [f"t{i} " for i in range(300)]
        assert lines[-1] == {"done": True}
        # Chunked framing was decoded: nothing of it is left in the text.
        assert b"\r\n" not in data
        assert http.connections() == 1
    await http.close()


async def test_requests_at_once_each_get_their_own_connection_and_answer() -> None:
    http = AgentHttp()
    async with uvicorn_agent() as endpoint:

        async def one(i: int) -> object:
            resp = await http.post(endpoint, "/run", json.dumps(i).encode())
            data = await resp.read()
            resp.release()
            return json.loads(data)["echo"]

        assert await asyncio.gather(*(one(i) for i in range(16))) == list(range(16))
        assert 1 <= http.connections() <= 16
    await http.close()
    assert http.connections() == 0


async def test_status_headers_and_body_of_an_error_answer() -> None:
    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(answer(b'{"code":"instance_busy"}', b"503 Busy", b"Retry-After: 3\r\n"))
            await reader.read()

        return serve

    http = AgentHttp()
    async with scripted(handler) as (_, endpoint):
        resp = await http.post(endpoint, "/run", b"{}", headers=[(b"X-Trace", b"7")])
        assert resp.status == 503
        assert resp.headers["retry-after"] == "3"
        assert await resp.read() == b'{"code":"instance_busy"}'
        resp.release()
    await http.close()


async def test_sends_the_body_and_headers_given() -> None:
    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(answer(b"{}"))
            await reader.read()

        return serve

    http = AgentHttp()
    async with scripted(handler) as (srv, endpoint):
        resp = await http.post(endpoint, "/x", b"\x00\x01", b"application/octet-stream")
        await resp.read()
        resp.release()
    request = srv.requests[0]
    assert request.startswith(b"POST /x HTTP/1.1\r\n")
    assert f"Host: {endpoint.removeprefix('http://')}".encode() in request
    assert b"Content-Type: application/octet-stream\r\nContent-Length: 2\r\n" in request
    assert request.endswith(b"\r\n\r\n\x00\x01")
    await http.close()


async def test_a_connection_idle_past_keepalive_is_not_reused() -> None:
    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await srv.read_request(reader)
                writer.write(answer(b"{}"))

        return serve

    http = AgentHttp(keepalive_s=0.2)
    async with scripted(handler) as (srv, endpoint):
        for _ in range(2):
            resp = await http.post(endpoint, "/run", b"{}")
            await resp.read()
            resp.release()
        assert srv.connections == 1
        await asyncio.sleep(0.3)
        resp = await http.post(endpoint, "/run", b"{}")
        await resp.read()
        resp.release()
        assert srv.connections == 2
    await http.close()


def chunked_stream(srv: Scripted, *, end: bool) -> Handler:
    """Answers each request with one chunked event; its final chunk 50 ms later, if `end`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await srv.read_request(reader)
            event = b'{"done": true}\n'
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head + b"%x\r\n" % len(event) + event + b"\r\n")
            await writer.drain()
            if not end:
                await reader.read()  # until the client closes
                return
            await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return serve


@pytest.mark.parametrize("end", [True, False])
async def test_a_stream_released_before_its_end_is_reused_once_it_ends(end: bool) -> None:
    # A stream's reader has its last event before the final chunk arrives; the connection
    # waits for that chunk (RELEASE_WAIT_S) instead of being closed.
    http = AgentHttp()
    async with scripted(lambda srv: chunked_stream(srv, end=end)) as (srv, endpoint):
        for _ in range(2):
            resp = await http.post(endpoint, "/stream", b"{}")
            assert await resp.readany(5.0) == b'{"done": true}\n'
            resp.release()
            await asyncio.sleep(RELEASE_WAIT_S + 0.2 if not end else 0.2)
        assert srv.connections == (1 if end else 2)
        assert http.connections() == (1 if end else 0)
    await http.close()


async def test_connection_closed_mid_body_is_connection_lost_and_not_reused() -> None:
    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial')
            await writer.drain()

        return serve

    http = AgentHttp()
    async with scripted(handler) as (_, endpoint):
        resp = await http.post(endpoint, "/run", b"{}")
        with pytest.raises(ConnectionLost):
            await resp.read()
        resp.release()
        assert http.connections() == 0
    await http.close()


async def test_closed_before_any_answer_is_connection_lost() -> None:
    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)

        return serve

    http = AgentHttp()
    async with scripted(handler) as (_, endpoint):
        with pytest.raises(ConnectionLost):
            await http.post(endpoint, "/run", b"{}")
    await http.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"garbage that is not http\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    ],
)
async def test_an_answer_that_is_not_http_is_a_bad_answer(reply: bytes) -> None:
    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(reply)
            await reader.read()

        return serve

    http = AgentHttp()
    async with scripted(handler) as (_, endpoint):
        with pytest.raises(BadAnswer):
            resp = await http.post(endpoint, "/run", b"{}")
            await resp.read()
        assert http.connections() == 0
    await http.close()


async def test_bytes_after_a_complete_answer_break_the_connection() -> None:
    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(answer(b"{}") + answer(b'{"unasked": 1}'))
            await reader.read()

        return serve

    http = AgentHttp()
    async with scripted(handler) as (srv, endpoint):
        resp = await http.post(endpoint, "/run", b"{}")
        assert await resp.read() == b"{}"
        resp.release()
        await asyncio.sleep(0.05)
        # The next request never reads the unasked answer: it gets a new connection.
        with contextlib.suppress(ConnectionLost):
            resp = await http.post(endpoint, "/run", b"{}")
        assert srv.connections == 2
    await http.close()


async def test_refused_and_malformed_endpoints_are_connect_failed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = AgentHttp()
    with pytest.raises(ConnectFailed):
        await http.post(f"http://127.0.0.1:{port}", "/run", b"{}")
    for endpoint in ("ftp://127.0.0.1:1", "http://127.0.0.1", "not a url"):
        with pytest.raises(ConnectFailed):
            await http.post(endpoint, "/run", b"{}")
    await http.close()


async def test_a_silent_stream_times_out_and_a_cancelled_read_closes_the_connection() -> None:
    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await reader.read()  # until the client closes

        return serve

    http = AgentHttp()
    async with scripted(handler) as (srv, endpoint):
        resp = await http.post(endpoint, "/stream", b"{}")
        assert await resp.readany(1.0) == b"abc"
        with pytest.raises(TimeoutError):
            await resp.readany(0.1)
        # The agent saw the connection close: that is how it learns its client left.
        await asyncio.wait_for(srv.closed.wait(), 2)

        srv.closed.clear()
        resp = await http.post(endpoint, "/stream", b"{}")
        task = asyncio.create_task(resp.read())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(srv.closed.wait(), 2)
        assert http.connections() == 0
    await http.close()


async def test_a_large_unread_body_pauses_reading_and_arrives_whole() -> None:
    size = 8 << 20

    def handler(srv: Scripted) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                await srv.read_request(reader)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                for _ in range(size // 65536):
                    writer.write(b"x" * 65536)
                    await writer.drain()

        return serve

    http = AgentHttp()
    async with scripted(handler) as (_, endpoint):
        resp = await http.post(endpoint, "/run", b"{}")
        await asyncio.sleep(0.2)  # the server writes while nobody reads
        assert len(await resp.read()) == size
        resp.release()
        with pytest.raises(BadAnswer):
            resp = await http.post(endpoint, "/run", b"{}")
            await resp.read(limit=1024)
    await http.close()
