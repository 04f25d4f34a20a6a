"""A spare agent: a process in a warm container, its imports done, waiting to become an instance.

A fresh container spends most of an instance's cold start importing torch and transformers.
The docker runtime keeps a few containers (MLCP_DOCKER_SPARES) in which this process has done
that already; starting an instance claims one: the container is renamed for the instance, given
its memory limit, and this process becomes the instance's agent on the port it listens on.

Requests carry the `x-mlcp-spare-token` header with the MLCP_SPARE_TOKEN the container was
started with (a wrong one: 403; anything else unknown: 404):

- `GET /hold`: a 200 head at once, then `ready` once the imports are done. The spare exits when
  this connection closes while it is unclaimed (the control plane that made it is gone), and
  when none was opened within HOLD_WAIT_S of its start.
- `POST /claim` with `{"argv": ["serve", ...]}`, the agent's `serve` options: answered 200,
  then every connection is closed and the process serves that model on the same port.
"""

from __future__ import annotations

import hmac
import json
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any

TOKEN_ENV = "MLCP_SPARE_TOKEN"
TOKEN_HEADER = b"x-mlcp-spare-token"
HOLD_WAIT_S = 60.0
MAX_REQUEST_BYTES = 1 << 16
# Printed once the imports are done (the container's log says when a spare is ready).
READY_LINE = "mlcp-spare: ready"


def _answer(status: str, body: bytes = b"", *, more: bool = False) -> bytes:
    length = b"" if more else b"Content-Length: %d\r\n" % len(body)
    head = b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: text/plain\r\n" + length
    return head + b"Connection: close\r\n\r\n" + body


def parse_request(data: bytes) -> tuple[str, str, dict[bytes, bytes], bytes] | None:
    """(method, path, headers, body) of a whole request in `data`; None while incomplete."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise ValueError("not an HTTP request line")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError("a header line without a colon")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0") or 0)
    if length < 0 or length > MAX_REQUEST_BYTES:
        raise ValueError("a body of a bad length")
    if len(rest) < length:
        return None
    return parts[0].decode("latin-1"), parts[1].decode("latin-1"), headers, rest[:length]


def claim_argv(body: bytes) -> list[str]:
    """The `serve` arguments of a claim; ValueError for anything else."""
    request: Any = json.loads(body)
    argv = request.get("argv") if isinstance(request, dict) else None
    if not (
        isinstance(argv, list)
        and argv
        and argv[0] == "serve"
        and all(isinstance(a, str) for a in argv)
    ):
        raise ValueError('a claim is {"argv": ["serve", ...]}')
    return argv


class _Spare:
    def __init__(self, listener: socket.socket, token: bytes, importer: threading.Thread) -> None:
        self.listener = listener
        self.token = token
        self.importer = importer
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ)
        self.buffers: dict[socket.socket, bytes] = {}
        self.holds: list[socket.socket] = []
        self.held = False
        self.ready_sent = False
        self.claimed: list[str] | None = None

    def close_all(self) -> None:
        for key in list(self.sel.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            self.sel.unregister(sock)
            sock.close()
        self.sel.close()

    def run(self, started: float) -> int | None:
        """Serve until claimed (the claim's argv is in `self.claimed`) or told to go (0)."""
        while self.claimed is None:
            for key, _ in self.sel.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    self._accept()
                elif self._read(sock) == "gone":
                    return 0
            if not self.ready_sent and not self.importer.is_alive():
                self.ready_sent = True
                print(READY_LINE, flush=True)
                for hold in self.holds:
                    _send(hold, b"ready\n")
            if not self.held and time.monotonic() - started > HOLD_WAIT_S:
                print("mlcp-spare: no control plane held this spare; exiting", flush=True)
                return 0
        return None

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setblocking(False)
        self.buffers[conn] = b""
        self.sel.register(conn, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        self.buffers.pop(sock, None)
        self.sel.unregister(sock)
        sock.close()

    def _read(self, sock: socket.socket) -> str | None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if sock in self.holds:
            if data:
                return None  # a holder sends nothing more; ignored
            print("mlcp-spare: its control plane let go; exiting", flush=True)
            return "gone"
        if not data:
            self._drop(sock)
            return None
        buffer = self.buffers[sock] + data
        if len(buffer) > 2 * MAX_REQUEST_BYTES:
            self._drop(sock)
            return None
        try:
            request = parse_request(buffer)
        except ValueError as exc:
            _send(sock, _answer("400 Bad Request", str(exc).encode()))
            self._drop(sock)
            return None
        if request is None:
            self.buffers[sock] = buffer
            return None
        self._handle(sock, *request)
        return None

    def _handle(
        self, sock: socket.socket, method: str, path: str, headers: dict[bytes, bytes], body: bytes
    ) -> None:
        if not hmac.compare_digest(headers.get(TOKEN_HEADER, b""), self.token):
            _send(sock, _answer("403 Forbidden", b"a spare answers its control plane only"))
            self._drop(sock)
        elif (method, path) == ("GET", "/hold"):
            self.buffers.pop(sock, None)
            self.holds.append(sock)
            self.held = True
            _send(sock, _answer("200 OK", more=True) + (b"ready\n" if self.ready_sent else b""))
        elif (method, path) == ("POST", "/claim"):
            try:
                argv = claim_argv(body)
            except ValueError as exc:
                _send(sock, _answer("422 Unprocessable Entity", str(exc).encode()))
                self._drop(sock)
                return
            _send(sock, _answer("200 OK", b"claimed"))
            self.claimed = argv
        else:
            _send(sock, _answer("404 Not Found", b"no such route"))
            self._drop(sock)


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.setblocking(True)
        sock.settimeout(2.0)
        sock.sendall(data)
        sock.setblocking(False)
    except OSError:
        pass


def serve(host: str, port: int) -> int:
    """Wait as a spare; once claimed, serve as the claim says. The exit code."""
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        print(f"mlcp-spare: {TOKEN_ENV} is not set", file=sys.stderr, flush=True)
        return 2
    started = time.monotonic()
    from instance_agent import zygote

    importer = threading.Thread(target=zygote.preload, name="mlcp-spare-imports", daemon=True)
    importer.start()
    listener = socket.create_server((host, port))
    listener.setblocking(False)
    spare = _Spare(listener, token.encode(), importer)
    try:
        code = spare.run(started)
    finally:
        spare.close_all()
    if code is not None or spare.claimed is None:
        return code or 0
    importer.join()
    print("mlcp-spare: claimed", flush=True)
    from instance_agent.__main__ import main

    return main(spare.claimed)
