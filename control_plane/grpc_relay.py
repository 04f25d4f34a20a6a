"""The gRPC port's front door: HTTP/2 frames relayed, never a gRPC call decoded in Python.

A grpc.aio server in the middle of every call cost about what the call itself costs (one more
Python gRPC hop each way). This relay reads the frames of each client connection, decodes only
header blocks, and passes everything else through:

- a new stream's headers go to `decide(path, headers)`, which answers with an admitted `Target`
  (a warm API the key may call, within its limits: the call goes straight to the instance's gRPC
  port) or None (the call goes to the front's own grpc.aio server on loopback, which does the
  rest: a cold API's load, every error status, reflection, health);
- upstream, each target has one multiplexed connection; a call's headers are encoded anew for it
  (without the key's headers for an instance), its DATA frames pass as they came with the stream
  id rewritten, within both sides' flow-control windows, so a slow reader slows its writer;
- the reply's headers, messages and trailers come back the same way; the trailers' grpc-status
  ends the call (`Target.ended`); a client's cancel (RST_STREAM, or its connection closing) resets
  the upstream stream; an instance whose connection fails answers UNAVAILABLE (`Target.failed`);
- a message over `max_message` bytes either way is refused with RESOURCE_EXHAUSTED, as grpcio
  refuses one, before it reaches the other side.

The peer breaking HTTP/2 closes its connection (GOAWAY with the error's code); nothing a client
sends reaches the control plane's other work.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from control_plane import h2_wire as h2

logger = logging.getLogger(__name__)

# Each side may send this much of a stream, and of a connection, before we credit it again.
STREAM_WINDOW = 1 << 20
CONN_WINDOW = 16 << 20
MAX_HEADER_LIST = 65_536
# Streams one client connection may hold open at once.
MAX_STREAMS = 10_000
UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL = 14, 8, 13
GONE = "the API's instance is unavailable (it stopped or died)"
PRIVATE_HEADERS = frozenset(("authorization", "x-api-key", "cookie"))

_OUT_HEADERS, _OUT_DATA = 0, 1


class Target(Protocol):
    """An admitted call's destination; the relay calls `ended` or `failed` exactly once."""

    address: tuple[str, int]

    def ended(self, status: int | None) -> None:
        """The call ended: the upstream's grpc-status, None when it gave none (cancelled)."""

    def failed(self) -> None:
        """The connection to the instance failed (refused, or broken mid-call)."""


Decide = Callable[[str, list[tuple[str, str]]], Awaitable[Target | None]]


def _status_of(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name == "grpc-status":
            return int(value) if value.isdigit() else None
    return None


def error_block(code: int, message: str, *, replied: bool, retry_after: str | None = None) -> bytes:
    """The trailers (or the whole trailers-only answer) of a call the relay answers itself."""
    fields = [] if replied else [(":status", "200"), ("content-type", "application/grpc")]
    fields += [("grpc-status", str(code)), ("grpc-message", h2.percent_encode(message))]
    if retry_after:
        fields.append(("retry-after", retry_after))
    return h2.encode_headers(fields)


class _Sizer:
    """Finds where gRPC messages (a 5-byte prefix, then the body) begin in a stream's bytes."""

    __slots__ = ("_head", "_need")

    def __init__(self) -> None:
        self._need = 0
        self._head = b""

    def largest(self, data: bytes) -> int:
        """The length of the largest message whose prefix is in `data`; -1 if none is."""
        pos, end, largest = 0, len(data), -1
        while pos < end:
            if self._need:
                take = min(self._need, end - pos)
                self._need -= take
                pos += take
                continue
            want = 5 - len(self._head)
            self._head += data[pos : pos + want]
            pos += want
            if len(self._head) == 5:
                self._need = int.from_bytes(self._head[1:5], "big")
                largest = max(largest, self._need)
                self._head = b""
        return largest


class _Connection(asyncio.Protocol, abc.ABC):
    """What both sides share: frame reading, batched writes, SETTINGS, PING, windows."""

    def __init__(self, relay: GrpcRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.reader = h2.FrameReader()
        self.decoder = h2.HpackDecoder(max_list=MAX_HEADER_LIST)
        self.calls: dict[int, _Call] = {}
        # What we may send: the peer's connection window, its streams' initial window, its
        # largest frame.
        self.send_window = h2.DEFAULT_WINDOW
        self.peer_initial = h2.DEFAULT_WINDOW
        self.peer_max_frame = h2.DEFAULT_MAX_FRAME
        self._credit = 0  # bytes received and passed on, not yet credited to the peer
        self._out: list[bytes] = []
        self._flushing = False
        self._headers: tuple[int, int, list[bytes]] | None = None  # a block awaiting CONTINUATION
        self.closed = False

    # -- writing --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queued; written with everything else queued in this turn of the loop."""
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self.transport is not None and self._out and not self.closed:
            self.transport.write(b"".join(self._out))
            self._out.clear()

    def credit(self, n: int) -> None:
        """`n` bytes of the peer's DATA were passed on (or dropped): the peer may send more."""
        self._credit += n
        if self._credit >= CONN_WINDOW // 4:
            self.write(h2.window_update(0, self._credit))
            self._credit = 0

    def stream_credit(self, sid: int, ended: bool, pending: int, n: int) -> int:
        """`n` bytes of the peer's DATA on stream `sid` were passed on: credit the connection,
        and the stream (unless the peer ended it) once a quarter of its window is due; the
        stream's credit still due."""
        self.credit(n)
        if ended:
            return 0
        pending += n
        if pending >= STREAM_WINDOW // 4:
            self.write(h2.window_update(sid, pending))
            return 0
        return pending

    def send_data(self, sid: int, data: bytes, end: bool, window: int) -> int:
        """Write as much of `data` as the stream's `window`, the connection's and the peer's
        frame size allow, END_STREAM with its last byte; the bytes written."""
        room = min(window, self.send_window, self.peer_max_frame)
        if data and room <= 0:
            return 0
        part = data if len(data) <= room else data[:room]
        last = end and len(part) == len(data)
        self.write(h2.frame(h2.DATA, h2.END_STREAM if last else 0, sid, part))
        self.send_window -= len(part)
        return len(part)

    # -- reading --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        with contextlib.suppress(OSError):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            for ftype, flags, sid, payload in self.reader.feed(self.preamble(data)):
                if self.closed:
                    return
                self.frame(ftype, flags, sid, payload)
        except h2.H2Error as exc:
            self.abort(exc.code, str(exc))
        except Exception:
            logger.exception("relaying gRPC frames failed")
            self.abort(h2.INTERNAL_ERROR, "the relay failed")

    def preamble(self, data: bytes) -> bytes:
        return data

    def frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._headers is not None:
            hsid, hflags, parts = self._headers
            if ftype != h2.CONTINUATION or sid != hsid:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "a header block without its CONTINUATION")
            parts.append(payload)
            if flags & h2.END_HEADERS:
                self._headers = None
                self.headers(sid, hflags, b"".join(parts))
            return
        if ftype == h2.DATA:
            call = self.calls.get(sid)
            if call is None:
                self.credit(len(payload))  # a stream already ended: dropped, the window kept
            else:
                self.data(call, h2.unpad(payload, flags), bool(flags & h2.END_STREAM), payload)
        elif ftype == h2.HEADERS:
            block = h2.header_block(payload, flags)
            if flags & h2.END_HEADERS:
                self.headers(sid, flags, block)
            else:
                self._headers = (sid, flags, [block])
        elif ftype == h2.WINDOW_UPDATE:
            increment = h2.parse_u32(payload) & 0x7FFFFFFF
            if sid == 0:
                self.send_window += increment
                for call in list(self.calls.values()):
                    self.drain(call)
            elif (call := self.calls.get(sid)) is not None:
                self.window(call, increment)
        elif ftype == h2.SETTINGS:
            if not flags & h2.ACK:
                self.settings(h2.parse_settings(payload))
                self.write(h2.frame(h2.SETTINGS, h2.ACK, 0))
        elif ftype == h2.PING:
            if not flags & h2.ACK:
                self.write(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif ftype == h2.RST_STREAM:
            code = h2.parse_u32(payload)
            if (call := self.calls.get(sid)) is not None:
                self.reset(call, code)
        elif ftype == h2.GOAWAY:
            self.goaway_received(h2.parse_u32(payload[:4]) & 0x7FFFFFFF if payload else 0)
        elif ftype in (h2.PUSH_PROMISE, h2.CONTINUATION):
            raise h2.H2Error(h2.PROTOCOL_ERROR, f"an unexpected frame of type {ftype}")
        # PRIORITY and unknown types are ignored.

    def settings(self, pairs: list[tuple[int, int]]) -> None:
        for key, value in pairs:
            if key == h2.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > h2.MAX_WINDOW:
                    raise h2.H2Error(h2.FLOW_CONTROL_ERROR, "an initial window over 2^31-1")
                delta, self.peer_initial = value - self.peer_initial, value
                for call in list(self.calls.values()):
                    self.window(call, delta)
            elif key == h2.SETTINGS_MAX_FRAME_SIZE:
                if not h2.DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise h2.H2Error(h2.PROTOCOL_ERROR, f"a max frame size of {value}")
                self.peer_max_frame = value

    def abort(self, code: int, message: str) -> None:
        """The peer broke the protocol (or the relay failed): GOAWAY, then close."""
        if not self.closed:
            logger.info("gRPC relay: closing a connection: %s", message)
            self.write(h2.goaway(0, code, message.encode("utf-8", "replace")[:200]))
            self._flush()
            if self.transport is not None:
                self.transport.close()

    # -- per side -------------------------------------------------------------------------

    @abc.abstractmethod
    def headers(self, sid: int, flags: int, block: bytes) -> None:
        """A whole header block on stream `sid` (decoded here, in arrival order)."""

    @abc.abstractmethod
    def data(self, call: _Call, data: bytes, end: bool, frame_payload: bytes) -> None:
        """A DATA frame's data (padding removed) for `call`."""

    @abc.abstractmethod
    def window(self, call: _Call, increment: int) -> None:
        """The peer let `call`'s stream take `increment` more bytes."""

    @abc.abstractmethod
    def drain(self, call: _Call) -> None:
        """Send what waits for this side's windows on `call`."""

    @abc.abstractmethod
    def reset(self, call: _Call, code: int) -> None:
        """The peer reset `call`'s stream."""

    @abc.abstractmethod
    def goaway_received(self, last_sid: int) -> None:
        """The peer takes no stream after `last_sid`."""


class _Client(_Connection):
    """A connection from a gRPC client."""

    def __init__(self, relay: GrpcRelay) -> None:
        super().__init__(relay)
        self._preface = b""
        self._open = False
        self.last_sid = 0
        self.going_away = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.clients.add(self)
        self.write(
            h2.settings_frame(
                [
                    (h2.SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                    (h2.SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
                ]
            )
            + h2.window_update(0, CONN_WINDOW - h2.DEFAULT_WINDOW)
        )

    def preamble(self, data: bytes) -> bytes:
        if self._open:
            return data
        self._preface += data
        if len(self._preface) < len(h2.PREFACE):
            if not h2.PREFACE.startswith(self._preface):
                raise h2.H2Error(h2.PROTOCOL_ERROR, "not HTTP/2 (no client preface)")
            return b""
        if not self._preface.startswith(h2.PREFACE):
            raise h2.H2Error(h2.PROTOCOL_ERROR, "not HTTP/2 (no client preface)")
        self._open = True
        rest, self._preface = self._preface[len(h2.PREFACE) :], b""
        return rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.clients.discard(self)
        for call in list(self.calls.values()):
            call.client_gone()

    def headers(self, sid: int, flags: int, block: bytes) -> None:
        fields = self.decoder.decode(block)  # always: the decoder's table follows every block
        end = bool(flags & h2.END_STREAM)
        call = self.calls.get(sid)
        if call is not None:  # trailers from the client: only their END_STREAM matters
            if end:
                call.from_client(b"", True, 0)
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            raise h2.H2Error(h2.PROTOCOL_ERROR, f"a new stream {sid} after {self.last_sid}")
        self.last_sid = sid
        if self.going_away or len(self.calls) >= MAX_STREAMS:
            self.write(h2.rst_stream(sid, h2.REFUSED_STREAM))
            return
        call = self.calls[sid] = _Call(self, sid, fields, end)
        self.relay.route(call)

    def data(self, call: _Call, data: bytes, end: bool, frame_payload: bytes) -> None:
        call.from_client(data, end, len(frame_payload))

    def window(self, call: _Call, increment: int) -> None:
        call.client_window += increment
        call.drain_to_client()

    def drain(self, call: _Call) -> None:
        call.drain_to_client()

    def reset(self, call: _Call, code: int) -> None:
        call.client_gone()

    def goaway_received(self, last_sid: int) -> None:
        pass  # the client opens no more streams; the open ones finish

    def go_away(self) -> None:
        """No new streams (the relay is stopping); the open ones finish."""
        if not self.going_away and not self.closed:
            self.going_away = True
            self.write(h2.goaway(self.last_sid, h2.NO_ERROR))


class _Upstream(_Connection):
    """The relay's connection to one target: an instance's gRPC port, or the front's own."""

    def __init__(self, relay: GrpcRelay, address: tuple[str, int]) -> None:
        super().__init__(relay)
        self.address = address
        self._next_sid = 1
        self.draining = False
        self.failed = False
        self._out.append(
            h2.PREFACE
            + h2.settings_frame(
                [(h2.SETTINGS_ENABLE_PUSH, 0), (h2.SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW)]
            )
            + h2.window_update(0, CONN_WINDOW - h2.DEFAULT_WINDOW)
        )

    def connect(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(
            loop.create_connection(lambda: self, self.address[0], self.address[1])
        )
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[tuple[asyncio.Transport, _Upstream]]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._lost()
        elif self.closed:
            # Closed (dropped) while connecting.
            assert self.transport is not None
            self.transport.close()
        else:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _lost(self) -> None:
        self.closed = True
        self.failed = True
        self.relay.forget(self)
        for call in list(self.calls.values()):
            call.upstream_failed()

    def close(self) -> None:
        self.closed = True
        self.relay.forget(self)
        if self.transport is not None:
            self.transport.close()

    def open_stream(self, call: _Call, block: bytes, end: bool) -> int:
        """A new stream for `call`, its headers written; 0 when the connection has failed."""
        if self.failed or self.draining:
            return 0
        sid = self._next_sid
        self._next_sid += 2
        self.calls[sid] = call
        self.write(h2.header_frames(sid, block, end, self.peer_max_frame))
        if self._next_sid > 2**31 - 1000:
            self.draining = True  # out of stream ids: the next call takes a new connection
            self.relay.forget(self)
        return sid

    def ended(self, sid: int) -> None:
        self.calls.pop(sid, None)
        if self.draining and not self.calls:
            self.close()

    def headers(self, sid: int, flags: int, block: bytes) -> None:
        fields = self.decoder.decode(block)
        call = self.calls.get(sid)
        if call is not None:
            call.from_upstream_headers(fields, bool(flags & h2.END_STREAM))

    def data(self, call: _Call, data: bytes, end: bool, frame_payload: bytes) -> None:
        call.from_upstream(data, end, len(frame_payload))

    def window(self, call: _Call, increment: int) -> None:
        call.up_window += increment
        call.drain_to_up()

    def drain(self, call: _Call) -> None:
        call.drain_to_up()

    def reset(self, call: _Call, code: int) -> None:
        call.upstream_reset(code)

    def goaway_received(self, last_sid: int) -> None:
        self.draining = True
        self.relay.forget(self)
        for sid, call in list(self.calls.items()):
            if sid > last_sid:
                call.upstream_failed()
        if not self.calls:
            self.close()


class _Call:
    """One relayed stream: the client's side, the upstream's side, and what waits between."""

    __slots__ = (
        "client",
        "client_credit",
        "client_ended",
        "client_window",
        "csid",
        "done",
        "fields",
        "headers_end",
        "replied",
        "sent_end",
        "sizer_in",
        "sizer_out",
        "status",
        "target",
        "to_client",
        "to_up",
        "up",
        "up_credit",
        "up_ended",
        "up_window",
        "usid",
    )

    def __init__(
        self, client: _Client, csid: int, fields: list[tuple[str, str]], end: bool
    ) -> None:
        self.client = client
        self.csid = csid
        self.fields = fields
        self.headers_end = end
        self.client_ended = end
        self.up: _Upstream | None = None
        self.usid = 0
        self.target: Target | None = None
        self.to_up: deque[tuple[bytes, bool, int]] = deque()
        self.to_client: deque[tuple[int, bytes, bool, int]] = deque()
        self.client_window = client.peer_initial
        self.up_window = 0
        self.client_credit = 0
        self.up_credit = 0
        self.up_ended = False
        self.replied = False
        self.sent_end = end  # END_STREAM written upstream
        self.done = False
        self.status: int | None = None
        self.sizer_in = _Sizer()
        self.sizer_out = _Sizer()

    @property
    def path(self) -> str:
        for name, value in self.fields:
            if name == ":path":
                return value
        return ""

    # -- opening ------------------------------------------------------------------------------

    def open(self, up: _Upstream, target: Target | None) -> None:
        self.target = target
        fields = self.fields
        if target is not None:
            fields = [f for f in fields if f[0] not in PRIVATE_HEADERS]
        sid = up.open_stream(self, h2.encode_headers(fields), self.headers_end)
        if not sid:
            self.upstream_failed()
            return
        self.up, self.usid = up, sid
        self.up_window = up.peer_initial
        self.drain_to_up()

    # -- client -> upstream ---------------------------------------------------------------

    def from_client(self, data: bytes, end: bool, size: int) -> None:
        if self.done or self.client_ended:
            self.client.credit(size)
            return
        if end:
            self.client_ended = True
        if data and self.sizer_in.largest(data) > self.client.relay.max_message:
            self.client.credit(size)
            self.refuse_size("Received message larger than max")
            return
        self.to_up.append((data, end, size))
        if self.up is not None:
            self.drain_to_up()

    def drain_to_up(self) -> None:
        up = self.up
        if up is None or self.done:
            return
        queue = self.to_up
        while queue:
            data, end, credit = queue[0]
            sent = up.send_data(self.usid, data, end, self.up_window)
            self.up_window -= sent
            if sent < len(data):
                if not sent:
                    return  # a window is full: the peer's WINDOW_UPDATE drains it
                queue[0] = (data[sent:], end, credit)
                continue
            queue.popleft()
            self.sent_end = end
            self.client_credit = self.client.stream_credit(
                self.csid, self.client_ended, self.client_credit, credit
            )

    # -- upstream -> client ---------------------------------------------------------------

    def from_upstream_headers(self, fields: list[tuple[str, str]], end: bool) -> None:
        if self.done:
            return
        if end:
            self.up_ended = True
            self.status = _status_of(fields)
        self.to_client.append((_OUT_HEADERS, h2.encode_headers(fields), end, 0))
        self.drain_to_client()

    def from_upstream(self, data: bytes, end: bool, size: int) -> None:
        up = self.up
        if self.done or self.up_ended:
            if up is not None:
                up.credit(size)
            return
        if end:
            self.up_ended = True
        if data and self.sizer_out.largest(data) > self.client.relay.max_message:
            if up is not None:
                up.credit(size)
            self.refuse_size("Sent message larger than max")
            return
        self.to_client.append((_OUT_DATA, data, end, size))
        self.drain_to_client()

    def drain_to_client(self) -> None:
        client = self.client
        queue = self.to_client
        while queue and not self.done:
            kind, payload, end, credit = queue[0]
            if kind == _OUT_HEADERS:
                client.write(h2.header_frames(self.csid, payload, end, client.peer_max_frame))
                self.replied = True
                queue.popleft()
            else:
                sent = client.send_data(self.csid, payload, end, self.client_window)
                self.client_window -= sent
                if sent < len(payload):
                    if not sent:
                        return
                    queue[0] = (kind, payload[sent:], end, credit)
                    continue
                queue.popleft()
                if self.up is not None:
                    self.up_credit = self.up.stream_credit(
                        self.usid, self.up_ended, self.up_credit, credit
                    )
            if end:
                self._close(self.status)

    # -- endings ----------------------------------------------------------------------------

    def _close(self, status: int | None, *, failed: bool = False) -> None:
        """Both sides are done with the call (the client's got its END_STREAM or a reset)."""
        if self.done:
            return
        self.done = True
        client, up = self.client, self.up
        client.calls.pop(self.csid, None)
        client.relay.call_ended()
        if not self.client_ended and not client.closed:
            # The answer is whole but the client still sends: it may stop (RFC 9113, 8.1).
            client.write(h2.rst_stream(self.csid, h2.NO_ERROR))
        if up is not None:
            if not failed and not (self.up_ended and self.sent_end):
                up.write(h2.rst_stream(self.usid, h2.CANCEL))
            up.ended(self.usid)
        self.to_up.clear()
        self.to_client.clear()
        target = self.target
        if target is not None:
            self.target = None
            if failed:
                target.failed()
            else:
                target.ended(status)

    def answer(self, code: int, message: str, retry_after: str | None = None) -> None:
        """End the call with the relay's own status (the upstream side is reset)."""
        if self.done:
            return
        self.to_client.clear()
        block = error_block(code, message, replied=self.replied, retry_after=retry_after)
        self.client.write(h2.header_frames(self.csid, block, True, self.client.peer_max_frame))

    def refuse_size(self, what: str) -> None:
        limit = self.client.relay.max_message
        self.answer(RESOURCE_EXHAUSTED, f"{what} (limit {limit} bytes)")
        self._close(None)

    def client_gone(self) -> None:
        """The client reset the stream or closed its connection: the upstream stream goes."""
        self.client_ended = True  # nothing more is written to it
        self._close(None)

    def upstream_reset(self, code: int) -> None:
        if self.done:
            return
        if self.up_ended:  # its answer is whole; the reset only stops our sending
            self.to_up.clear()
            return
        self.client.write(h2.rst_stream(self.csid, code))
        self.client_ended = True
        self.up_ended = True
        self._close(None)

    def upstream_failed(self) -> None:
        if self.done:
            return
        if self.target is not None:
            self.answer(UNAVAILABLE, GONE, "1")
        else:
            self.answer(UNAVAILABLE, "the control plane's gRPC service is unavailable", "1")
        self.up_ended = True
        self._close(None, failed=True)


class GrpcRelay:
    """The listening socket's server and every connection of both sides."""

    def __init__(
        self, sock: socket.socket, decide: Decide, internal: tuple[str, int], max_message: int
    ) -> None:
        self._sock = sock
        self._decide = decide
        self._internal = internal
        self.max_message = max_message
        self.clients: set[_Client] = set()
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self._all_upstreams: set[_Upstream] = set()
        self._routing: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        # Calls sent straight to an instance so far (the rest went to the front's server).
        self.direct_calls = 0
        self._drained: asyncio.Event | None = None  # set by `stop`: the last call has ended

    def call_ended(self) -> None:
        if self._drained is not None and not any(c.calls for c in self.clients):
            self._drained.set()

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Client(self), sock=self._sock)

    async def stop(self, grace_s: float) -> None:
        """Take no new connections or calls, let open calls end within `grace_s`, close all."""
        if self._server is not None:
            self._server.close()
        for client in list(self.clients):
            client.go_away()
        self._drained = asyncio.Event()
        if any(c.calls for c in self.clients):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace_s)
        for task in list(self._routing):
            task.cancel()
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.close()
        for up in list(self._all_upstreams):
            up.close()
        if self._server is not None:
            await self._server.wait_closed()

    def route(self, call: _Call) -> None:
        task = asyncio.ensure_future(self._route(call))
        self._routing.add(task)
        task.add_done_callback(self._routing.discard)

    async def _route(self, call: _Call) -> None:
        target: Target | None = None
        try:
            target = await self._decide(call.path, call.fields)
        except Exception:
            logger.exception("deciding where a gRPC call goes failed; the front answers it")
        if call.done:  # the client went meanwhile: an admitted call ends at once
            if target is not None:
                target.ended(None)
            return
        if target is not None:
            self.direct_calls += 1
        call.open(self.upstream(target.address if target else self._internal), target)

    def upstream(self, address: tuple[str, int]) -> _Upstream:
        up = self._upstreams.get(address)
        if up is None or up.closed or up.draining:
            up = self._upstreams[address] = _Upstream(self, address)
            self._all_upstreams.add(up)
            up.connect()
        return up

    def forget(self, up: _Upstream) -> None:
        if self._upstreams.get(up.address) is up:
            del self._upstreams[up.address]
        if up.closed:
            self._all_upstreams.discard(up)

    def drop(self, address: tuple[str, int]) -> None:
        """Close the connection to `address` once no call uses it (its instance is gone)."""
        up = self._upstreams.pop(address, None)
        if up is not None:
            up.draining = True
            if not up.calls:
                up.close()

    def connections_to(self, address: tuple[str, int]) -> int:
        """Open upstream connections to `address` (one, however many clients call it)."""
        return sum(1 for up in self._all_upstreams if up.address == address and not up.closed)
