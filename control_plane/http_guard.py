"""Limits on what a client may hold open, enforced in uvicorn's httptools protocol.

A fault probe (issue 17) found that a client sending one header byte every 2 s held a
connection forever, a body shorter than its Content-Length held a request over 70 s, 500 idle
connections stayed open and a 20 MB header was accepted: uvicorn has no receipt deadline, and
httptools no header-size limit. This protocol adds, per connection:

- an idle limit for a new connection that sends nothing (and uvicorn's keep-alive limit between
  requests, set to the same);
- a receipt deadline from a request's first byte until its headers and body are all in
  (408, then the connection is closed) — a long streamed *response* is never cut by it, and
  a file PUT to an upload URL is held to it between chunks instead of as a whole;
- a cap on the bytes of the request line and headers (431);
- a cap on open connections: one more is answered 503 with Retry-After at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


# How long a refused connection's input is still read (and dropped) before it is closed.
LINGER_S = 1.0
# PUTs under these paths stream files (control_plane/uploads.py, a deployed project and its
# weights, control_plane/api_bundle.py): timed per chunk, not whole.
UPLOAD_PATH_PREFIXES = (b"/v1/input/uploads/", b"/apis/")


@dataclass(frozen=True)
class HttpLimits:
    idle_s: float = 5.0
    receipt_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_connections: int = 1024


_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def raw_error(status: int, message: str, code: str, retry_after_s: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response in the JSON envelope, closing the connection."""
    body = json.dumps({"error": message, "code": code}).encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    if retry_after_s is not None:
        head.append(b"retry-after: %d" % retry_after_s)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request whose headers are too large."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `limits` is set by `guarded()`."""

    limits: HttpLimits = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._header_bytes = self._raw_bytes = 0
        self._in_headers = False
        self._refused = False
        self._per_chunk = False

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, response: bytes) -> None:
        """Answer with `response` unless one has started, and close the connection."""
        self._refused = True
        self._disarm()
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None:
            # The app may still be running for this request: what it sends now goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        if started or self.transport.is_closing():
            self.transport.close()
            return
        self.transport.write(response)
        # A lingering close: closing with unread input makes the kernel send a reset, and the
        # client loses the answer. Send it, stop writing, discard input for a moment, then close.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _expired(self, what: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if what == "idle":
            # Nothing was asked: close without an answer, as a keep-alive timeout does.
            self.transport.close()
            return
        self._refuse(
            raw_error(
                408,
                f"the request was not received within {self.limits.receipt_s:g} s",
                "request_timeout",
            )
        )

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                raw_error(503, "too many open connections; retry shortly", "server_busy", 1)
            )
            return
        self._arm(self.limits.idle_s, "idle")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_headers and not self._refused:
            # httptools buffers a header until it ends, so on_header alone would let one 20 MB
            # header in: count what arrives while the headers are incomplete as well.
            self._count(len(data), raw=True)

    def send_400_response(self, msg: str) -> None:
        if self._refused:  # a parser callback refused the request and answered already
            return
        super().send_400_response(msg)

    # -- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._header_bytes = self._raw_bytes = 0
        self._in_headers = True
        self._per_chunk = False
        self._arm(self.limits.receipt_s, "receipt")
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        super().on_headers_complete()
        if self.parser.get_method() == b"PUT" and self.url.startswith(UPLOAD_PATH_PREFIXES):
            # A file upload (up to MLCP_MAX_UPLOAD_BYTES) may rightly take longer than
            # receipt_s to arrive whole: from here its deadline is receipt_s between chunks.
            self._per_chunk = True
            self._arm(self.limits.receipt_s, "receipt")

    def on_body(self, body: bytes) -> None:
        if self._per_chunk:
            self._arm(self.limits.receipt_s, "receipt")
        super().on_body(body)

    def _count(self, size: int, *, raw: bool = False) -> None:
        if raw:
            self._raw_bytes += size
        else:
            self._header_bytes += size
        if max(self._header_bytes, self._raw_bytes) > self.limits.max_header_bytes:
            self._refuse(
                raw_error(
                    431,
                    f"the request line and headers must be at most "
                    f"{self.limits.max_header_bytes} bytes",
                    "headers_too_large",
                )
            )
            if not raw:
                raise _HeadersTooLarge

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def guarded(limits: HttpLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=` option, with these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
