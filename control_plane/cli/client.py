"""The CLI's HTTP client: one request per call, explicit timeouts, server errors as `CliError`.

Standard-library `urllib` on purpose: the CLI makes one request at a time, and starting it must
not import the server's dependencies.
"""

from __future__ import annotations

import codecs
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from http.client import HTTPResponse
from typing import Any

CONNECT_TIMEOUT_S = 10.0
# A call that answers in one piece: the server's own slow paths (a cold start waits 5 s) fit.
CALL_TIMEOUT_S = 60.0
# Streams: no overall limit, but a silence this long means the server or the network is gone
# (the server sends keep-alives every few seconds).
STREAM_IDLE_S = 300.0


class CliError(Exception):
    """A failure to show the user as one line; `exit_code` 1."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The server's HTTP status and error code, when the server answered.
        self.status = status
        self.code = code


def _server_error(status: int, raw: bytes) -> CliError:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code = body.get("code")
        code = code if isinstance(code, str) else None
        message = f"{body['error']} ({code}, HTTP {status})" if code else f"{body['error']}"
        return CliError(message, status=status, code=code)
    text = raw.decode("utf-8", "replace").strip().splitlines()
    return CliError(f"HTTP {status}" + (f": {text[0][:200]}" if text else ""), status=status)


def _cut_off(url: str) -> CliError:
    # The server answers an over-large body (413) and closes before urllib has sent it all.
    return CliError(
        f"{url} closed the connection during the upload (is it larger than the server takes?)"
    )


class Client:
    """Talks to one control plane with one key."""

    def __init__(self, url: str, key: str | None, timeout_s: float = CALL_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CliError(f"MLCP_URL must be an http:// or https:// URL, not {url!r}")
        self.url = url.rstrip("/")
        self.key = key
        self.timeout_s = timeout_s

    def _request(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.key:
            req.add_header("Authorization", f"Key {self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        return req

    def _open(self, req: urllib.request.Request, timeout_s: float) -> HTTPResponse:
        try:
            resp: HTTPResponse = urllib.request.urlopen(req, timeout=timeout_s)
            return resp
        except urllib.error.HTTPError as exc:
            with exc:
                raise _server_error(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, BrokenPipeError | ConnectionResetError) and req.data is not None:
                raise _cut_off(self.url) from None
            why = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
            raise CliError(f"cannot reach the control plane at {self.url}: {why}") from None
        except TimeoutError:
            raise CliError(f"{self.url} did not answer within {timeout_s:g} s") from None
        except (BrokenPipeError, ConnectionResetError):
            if req.data is None:
                raise CliError(f"the connection to {self.url} was reset") from None
            raise _cut_off(self.url) from None
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot reach the control plane at {self.url}: {exc}") from None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One request; the decoded JSON answer (or the text, for text answers)."""
        if query:
            path += "?" + urllib.parse.urlencode(query)
        req = self._request(method, path, body, headers)
        with self._open(req, self.timeout_s) as resp:
            try:
                raw = resp.read()
            except (TimeoutError, OSError) as exc:
                raise CliError(f"the answer from {self.url} broke off: {exc}") from None
            if "json" not in (resp.headers.get("content-type") or ""):
                return raw.decode("utf-8", "replace")
            try:
                return json.loads(raw)
            except ValueError:
                raise CliError(f"{self.url} sent an answer that is not JSON") from None

    def exists(self, path: str) -> bool:
        """`HEAD path`: True on 200, False on 404; another status is an error."""
        req = self._request("HEAD", path, None, None)
        try:
            with self._open(req, self.timeout_s):
                return True
        except CliError as exc:
            if exc.status == 404:
                return False
            raise

    def upload(
        self,
        method: str,
        path: str,
        chunks: Iterable[bytes],
        size: int,
        content_type: str,
        *,
        query: dict[str, str] | None = None,
    ) -> Any:
        """Send `size` bytes from `chunks` as the body (streamed); the decoded JSON answer."""
        if query:
            path += "?" + urllib.parse.urlencode(query)
        req = self._request(method, path, None, {"Content-Type": content_type})
        req.data = chunks  # urllib streams an iterable body
        req.add_header("Content-Length", str(size))
        with self._open(req, self.timeout_s) as resp:
            try:
                raw = resp.read()
            except (TimeoutError, OSError) as exc:
                raise CliError(f"the answer from {self.url} broke off: {exc}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise CliError(f"{self.url} sent an answer that is not JSON") from None

    def stream(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[str]:
        """Text as it arrives; closing the iterator (or Ctrl-C) closes the connection."""
        if query:
            path += "?" + urllib.parse.urlencode(query)
        req = self._request(method, path, body, headers)
        resp = self._open(req, CONNECT_TIMEOUT_S)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            # The socket timeout now bounds each read, not the whole stream.
            sock = getattr(getattr(resp, "fp", None), "raw", None)
            sock = getattr(sock, "_sock", None)
            if isinstance(sock, socket.socket):
                sock.settimeout(STREAM_IDLE_S)
            while True:
                try:
                    chunk = resp.read1(65536)
                except TimeoutError:
                    raise CliError(f"{self.url} went silent for {STREAM_IDLE_S:g} s") from None
                except OSError as exc:
                    raise CliError(f"the stream from {self.url} broke off: {exc}") from None
                if not chunk:
                    tail = decoder.decode(b"", final=True)
                    if tail:
                        yield tail
                    return
                text = decoder.decode(chunk)
                if text:
                    yield text
        finally:
            resp.close()


def sse_events(chunks: Iterator[str]) -> Iterator[dict[str, str]]:
    """Server-sent events parsed from text chunks: dicts with `event`, `id`, `data`."""
    buffer = ""
    event: dict[str, str] = {}
    data: list[str] = []
    for chunk in chunks:
        buffer += chunk
        while True:
            line, sep, rest = buffer.partition("\n")
            if not sep:
                break
            buffer = rest
            line = line.rstrip("\r")
            if not line:
                if data or event:
                    event["data"] = "\n".join(data)
                    event.setdefault("event", "message")
                    yield event
                event, data = {}, []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name in ("event", "id"):
                event[name] = value
