"""Uploads: a signed URL on mlcp, a PUT streamed to disk with a cap, and the cases that fail.

Real uvicorn on loopback, a real PostgreSQL, aiohttp and raw sockets as clients (a raw socket is
the only way to send a body shorter than its Content-Length, or one that lies about its size).
"""

from __future__ import annotations

import asyncio
import io
import uuid
import wave
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from control_plane import uploads
from control_plane.async_requests import clean_up
from control_plane.errors import UploadExpired
from db.rows import UploadRow
from tests.harness import Api, app_state, make_settings, serve

CAP = 64 * 1024


def wav_bytes(seconds: float = 0.5, rate: int = 16_000) -> bytes:
    """A real mono 16-bit WAV file of a 440 Hz tone."""
    import math

    frames = int(seconds * rate)
    pcm = b"".join(
        int(8000 * math.sin(2 * math.pi * 440 * i / rate)).to_bytes(2, "little", signed=True)
        for i in range(frames)
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


@pytest.fixture
async def uapi(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    settings = make_settings(
        db_dsn,
        tmp_path / "data",
        include_packaged_models=False,
        max_upload_bytes=CAP,
        request_timeout_s=2.0,
    )
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        yield Api(base, session, settings)


async def new_url(api: Api, extension: str = "wav", key: str | None = None) -> str:
    kwargs: dict[str, Any] = {} if key is None else {"key": key}
    status, body = await api.call(
        "POST", f"/v1/input/upload-url?extension={extension}", {}, **kwargs
    )
    assert status == 201, body
    url = body["uploadUrl"]["PUT"]
    assert url.startswith(api.base + "/v1/input/uploads/" + body["id"])
    return str(url)


async def put(api: Api, url: str, data: bytes, headers: dict[str, str] | None = None) -> Any:
    async with api.session.put(url, data=data, headers=headers or {}) as resp:
        return resp.status, await resp.json(content_type=None)


async def raw_put(api: Api, url: str, head_extra: str, body: bytes) -> bytes:
    """Send a PUT by hand on a socket (and close the write side); what came back."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    assert host is not None and port is not None
    reader, writer = await asyncio.open_connection(host, port)
    target = parts.path + "?" + parts.query
    writer.write(
        f"PUT {target} HTTP/1.1\r\nHost: {host}\r\n{head_extra}\r\n".encode("latin-1") + body
    )
    await writer.drain()
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def upload_row(api: Api, url: str) -> Any:
    rid = uuid.UUID(urlsplit(url).path.rsplit("/", 1)[1])
    return await app_state(api).pool.fetchrow("SELECT * FROM uploads WHERE id = $1", rid)


async def until_state(api: Api, url: str, want: str, timeout_s: float = 5) -> None:
    """The slot's cleanup runs after the connection is gone: wait for it."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (row := await upload_row(api, url))["state"] != want:
        assert asyncio.get_running_loop().time() < deadline, row
        await asyncio.sleep(0.05)


async def test_a_file_is_streamed_to_disk_once(uapi: Api) -> None:
    url = await new_url(uapi)
    data = wav_bytes()
    status, body = await put(uapi, url, data)
    assert status == 200 and body["size_bytes"] == len(data) and body["status"] == "complete"
    row = await upload_row(uapi, url)
    assert row["state"] == "complete" and row["size_bytes"] == len(data)
    path = uapi.settings.data_dir / "uploads" / f"{row['id']}.wav"
    assert path.read_bytes() == data
    # A second PUT to a completed slot is 409 and leaves the file as it was.
    status, body = await put(uapi, url, wav_bytes(0.1))
    assert status == 409 and body["code"] == "upload_complete"
    assert path.read_bytes() == data


async def test_the_signature_binds_the_slot_and_its_expiry(uapi: Api) -> None:
    url = await new_url(uapi)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    sig, expires = query["signature"][0], query["expires"][0]
    other = str(uuid.uuid4())
    bad_urls = [
        url.replace(sig, ("0" if sig[0] != "0" else "1") + sig[1:]),  # one digit changed
        url.replace(f"expires={expires}", f"expires={int(expires) + 3600}"),  # extended
        url.replace(parts.path.rsplit("/", 1)[1], other),  # another slot
        url.split("&signature=")[0],  # no signature
        url.split("?")[0],  # no query
        url.replace(f"expires={expires}", "expires=soon"),
        url.replace(parts.path.rsplit("/", 1)[1], "not-a-uuid"),
    ]
    for bad in bad_urls:
        status, body = await put(uapi, bad, wav_bytes(0.1))
        assert status == 403 and body["code"] == "invalid_signature", (bad, body)
    assert (await upload_row(uapi, url))["state"] == "open"


async def test_an_expired_url_is_403(uapi: Api) -> None:
    url = await new_url(uapi)
    state = app_state(uapi)
    row = await upload_row(uapi, url)
    # Move time: the URL's own expiry has passed (the signature still matches it).
    later = datetime.now(UTC) + timedelta(seconds=uapi.settings.upload_url_expiry_s + 1)
    ref = uploads.parse_ref(str(row["id"]), parse_qs(urlsplit(url).query))
    with pytest.raises(UploadExpired):
        uploads.verify(state.upload_secret, UploadRow.of(row), ref, later)
    await state.pool.execute(
        "UPDATE uploads SET expires_at = now() - interval '1 s' WHERE id = $1", row["id"]
    )
    new_expiry = await state.pool.fetchval(
        "SELECT expires_at FROM uploads WHERE id = $1", row["id"]
    )
    expires = int(new_expiry.timestamp())
    signed = uploads.sign(state.upload_secret, row["id"], row["key_id"], expires)
    expired = f"{url.split('?')[0]}?expires={expires}&signature={signed}"
    status, body = await put(uapi, expired, wav_bytes(0.1))
    assert status == 403 and body["code"] == "upload_expired", body


async def test_the_cap_is_counted_while_streaming(uapi: Api) -> None:
    url = await new_url(uapi)
    big = wav_bytes(3.0)  # ~96 KB > 64 KiB cap
    assert len(big) > CAP
    # Declared honestly: refused from the header.
    status, body = await put(uapi, url, big)
    assert status == 413 and body["code"] == "payload_too_large"

    # Chunked (no Content-Length): counted while it arrives.
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    async with uapi.session.put(url, data=chunks()) as resp:
        assert resp.status == 413 and (await resp.json())["code"] == "payload_too_large"
    row = await upload_row(uapi, url)
    assert row["state"] == "open"
    folder = uapi.settings.data_dir / "uploads"
    assert not folder.exists() or list(folder.iterdir()) == []
    # The slot is still usable for a file within the cap.
    status, body = await put(uapi, url, wav_bytes(0.2))
    assert status == 200, body


async def test_a_lying_or_truncated_content_length_stores_nothing(uapi: Api) -> None:
    url = await new_url(uapi)
    data = wav_bytes(0.2)
    # Claims less than it sends: the body is the declared 100 bytes and no more; the rest is
    # a malformed next request (400, connection closed), which may cut the first one short.
    answer = await raw_put(uapi, url, "Content-Length: 100\r\n", data)
    assert answer.split(b"\r\n")[0].split(b" ")[1] in (b"200", b"400"), answer
    await asyncio.sleep(0.3)
    row = await upload_row(uapi, url)
    assert row["state"] in ("open", "complete"), row
    if row["state"] == "complete":
        path = uapi.settings.data_dir / "uploads" / f"{row['id']}.wav"
        assert row["size_bytes"] == 100 and path.read_bytes() == data[:100]

    url = await new_url(uapi)
    # Claims more than it sends, then closes: the server sees the body cut short.
    parts = urlsplit(url)
    _reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(data) + 500}\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    await until_state(uapi, url, "writing")
    writer.close()
    await until_state(uapi, url, "open")
    folder = uapi.settings.data_dir / "uploads"
    assert [p.name for p in folder.iterdir() if p.name.endswith(".part")] == []

    # A Content-Length that is not a number is a bad request.
    answer = await raw_put(uapi, url, "Content-Length: lots\r\n", b"")
    assert answer.split(b"\r\n")[0].split(b" ")[1] == b"400", answer
    status, body = await put(uapi, url, data)
    assert status == 200, (body, await upload_row(uapi, url))


async def test_a_stalled_upload_times_out_between_chunks(uapi: Api) -> None:
    url = await new_url(uapi)
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    data = wav_bytes(0.5)
    writer.write(
        f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}"
        "\r\n\r\n".encode()
    )
    t0 = asyncio.get_running_loop().time()
    # Trickle for longer than request_timeout_s (2 s) in all, never silent for that long.
    for i in range(0, 1000, 250):
        writer.write(data[i : i + 250])
        await writer.drain()
        await asyncio.sleep(0.6)
    assert asyncio.get_running_loop().time() - t0 > 2.0
    writer.write(data[1000:])
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(200), 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    writer.close()
    # Then one that goes silent mid-body is cut after request_timeout_s.
    url2 = await new_url(uapi)
    p2 = urlsplit(url2)
    reader, writer = await asyncio.open_connection(p2.hostname, p2.port)
    writer.write(
        f"PUT {p2.path}?{p2.query} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}"
        "\r\n\r\n".encode()
        + data[:500]
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    assert b"408" in answer.split(b"\r\n")[0], answer
    writer.close()
    await until_state(uapi, url2, "open")


@pytest.mark.parametrize(
    ("extension", "data", "content_type"),
    [
        ("wav", b"this is not audio at all, just text", None),
        ("flac", b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        ("mp3", b"\x00\x01\x02\x03", None),
        ("wav", b"", None),
        ("wav", None, "application/json"),
        ("wav", None, "text/plain"),
    ],
)
async def test_a_file_that_is_not_its_kind_is_415(
    uapi: Api, extension: str, data: bytes | None, content_type: str | None
) -> None:
    url = await new_url(uapi, extension)
    headers = {"Content-Type": content_type} if content_type else {}
    status, body = await put(uapi, url, wav_bytes(0.1) if data is None else data, headers)
    assert status == 415 and body["code"] == "unsupported_media_type", body
    assert (await upload_row(uapi, url))["state"] == "open"


@pytest.mark.parametrize(
    "query", ["", "?extension=exe", "?extension=../../etc/passwd", "?extension=WAV%00"]
)
async def test_bad_upload_url_requests(uapi: Api, query: str) -> None:
    status, body = await uapi.call("POST", f"/v1/input/upload-url{query}", {})
    assert status == 422 and body["code"] == "invalid_field", body
    assert await app_state(uapi).pool.fetchval("SELECT count(*) FROM uploads") == 0


async def test_upload_url_needs_a_key_and_an_empty_object(uapi: Api) -> None:
    status, body = await uapi.call("POST", "/v1/input/upload-url?extension=wav", {}, key=None)
    assert status == 401
    status, body = await uapi.call("POST", "/v1/input/upload-url?extension=wav", {"x": 1})
    assert status == 422 and body["code"] == "unknown_field"
    status, body = await uapi.call("POST", "/v1/input/upload-url?extension=wav", [])
    assert status == 422 and body["code"] == "invalid_body"
    # No body at all is fine: curl -X POST sends none.
    async with uapi.session.post(
        uapi.base + "/v1/input/upload-url?extension=mp3", headers=uapi.headers()
    ) as resp:
        assert resp.status == 201


async def test_unused_uploads_go_after_expiry_and_complete_ones_after_retention(
    uapi: Api,
) -> None:
    state = app_state(uapi)
    open_url = await new_url(uapi)
    done_url = await new_url(uapi)
    assert (await put(uapi, done_url, wav_bytes(0.1)))[0] == 200
    done = await upload_row(uapi, done_url)
    path = uapi.settings.data_dir / "uploads" / f"{done['id']}.wav"
    assert path.is_file()
    now = datetime.now(UTC)
    await clean_up(state, now)
    assert await state.pool.fetchval("SELECT count(*) FROM uploads") == 2
    await state.pool.execute("UPDATE uploads SET expires_at = now() - interval '1 s'")
    await clean_up(state, now)
    # The open slot expired unused; the complete file stays for the retention period.
    assert await upload_row(uapi, open_url) is None
    assert await upload_row(uapi, done_url) is not None and path.is_file()
    await clean_up(state, now + timedelta(seconds=uapi.settings.async_retention_s + 1))
    assert await upload_row(uapi, done_url) is None and not path.exists()
