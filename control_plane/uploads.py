"""Upload slots: a signed URL on mlcp itself that a client PUTs one file to, as S3 presigns one.

`POST /v1/input/upload-url` stores an open slot bound to the asking key and answers a URL whose
query carries an expiry and an HMAC-SHA256 of (slot, key, expiry) under a secret every control
plane of the deployment reads from the database. The PUT needs no API key: the signature is the
credential, as with a presigned URL. The body is streamed to `MLCP_DATA_DIR/uploads`, counted
while it arrives (a Content-Length is a claim, not a fact), checked to be the kind of file its
extension says, and only then is the slot marked complete. A request that submits the URL reads
that file; both are deleted together once the request's retention period is over.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, urlsplit

import anyio.to_thread
from starlette.requests import ClientDisconnect, Request

from control_plane.errors import (
    InvalidField,
    InvalidHeader,
    InvalidSignature,
    PayloadTooLarge,
    UnsupportedMediaType,
    UploadComplete,
    UploadExpired,
    UploadIncomplete,
    UploadInProgress,
    UploadNotFound,
)
from control_plane.state import AppState
from db import async_queries as aq
from db.queries import Executor
from db.rows import UploadRow

SECRET_NAME = "upload_url"
UPLOAD_PATH = "/v1/input/uploads/"
# What an upload may be: the audio containers soundfile (libsndfile) decodes without ffmpeg.
EXTENSIONS = ("wav", "flac", "mp3", "ogg")
# Media types a PUT may declare; clients that send none (the seed's `requests.put`) are fine.
_MEDIA_TYPES = frozenset({"application/octet-stream", "binary/octet-stream"})
# Written to disk in pieces this large, off the event loop.
_WRITE_BYTES = 1 << 20


def sign(secret: bytes, upload_id: uuid.UUID, key_id: int, expires: int) -> str:
    """The signature of one slot's URL: HMAC-SHA256 over its id, its key and its expiry."""
    message = f"{upload_id}.{key_id}.{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def upload_url(base: str, secret: bytes, row: UploadRow) -> str:
    """The URL a client PUTs the file to."""
    expires = int(row.expires_at.timestamp())
    signature = sign(secret, row.id, row.key_id, expires)
    return f"{base.rstrip('/')}{UPLOAD_PATH}{row.id}?expires={expires}&signature={signature}"


@dataclass(frozen=True)
class SignedRef:
    """What a signed URL claims: the slot, its expiry and the signature over both."""

    upload_id: uuid.UUID
    expires: int
    signature: str


def parse_ref(upload_id: str, query: dict[str, list[str]]) -> SignedRef:
    """The claim of a URL's path id and query; anything malformed is a tampered URL (403)."""
    try:
        rid = uuid.UUID(upload_id)
        (expires_text,) = query["expires"]
        (signature,) = query["signature"]
        if not (expires_text.isascii() and expires_text.isdigit() and len(expires_text) <= 12):
            raise ValueError(expires_text)
        return SignedRef(rid, int(expires_text), signature)
    except (KeyError, ValueError) as exc:
        raise InvalidSignature() from exc


def parse_upload_url(url: object) -> SignedRef:
    """The claim of an upload URL given in a submission's `URL` field (422 if not one)."""
    if not isinstance(url, str) or len(url) > 2048:
        raise InvalidField("'URL' must be the upload URL POST /v1/input/upload-url answered")
    parts = urlsplit(url)
    if not parts.path.startswith(UPLOAD_PATH):
        raise InvalidField("'URL' must be the upload URL POST /v1/input/upload-url answered")
    return parse_ref(parts.path[len(UPLOAD_PATH) :], parse_qs(parts.query))


def verify(secret: bytes, row: UploadRow | None, ref: SignedRef, now: datetime) -> UploadRow:
    """The slot a signed reference names, or 403: unknown, tampered with, or expired."""
    if row is None:
        raise InvalidSignature()
    expected = sign(secret, row.id, row.key_id, ref.expires)
    if not hmac.compare_digest(expected, ref.signature):
        raise InvalidSignature()
    if ref.expires != int(row.expires_at.timestamp()):
        raise InvalidSignature()
    if now.timestamp() >= ref.expires:
        raise UploadExpired()
    return row


def sniff(extension: str, head: bytes) -> bool:
    """Whether the first bytes of a file are those of its extension's container."""
    if extension == "wav":
        return head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE"
    if extension == "flac":
        return head[:4] == b"fLaC"
    if extension == "ogg":
        return head[:4] == b"OggS"
    if extension == "mp3":
        # An ID3 tag, or an MPEG audio frame sync (11 set bits).
        return head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
    return False


def check_extension(text: str | None) -> str:
    """The `extension` query parameter of `POST /v1/input/upload-url`."""
    if text is None or text not in EXTENSIONS:
        raise InvalidField(f"'extension' must be one of {', '.join(EXTENSIONS)}")
    return text


def check_media_type(content_type: str | None) -> None:
    """A PUT declares no media type, an octet stream or audio; anything else is 415."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media not in _MEDIA_TYPES and not media.startswith("audio/"):
        raise UnsupportedMediaType(
            "an upload is the file's bytes: send Content-Type audio/* or application/octet-stream"
        )


def upload_dir(state: AppState) -> Path:
    return state.settings.data_dir / "uploads"


def file_path(state: AppState, row: UploadRow) -> Path:
    """Where a complete upload lies; named by its id only, never by anything a user wrote."""
    return upload_dir(state) / f"{row.id}.{row.extension}"


async def server_secret(db: Executor) -> bytes:
    """The deployment's upload-URL secret, made by whichever control plane asks first."""
    while True:
        value = await aq.ensure_server_secret(db, SECRET_NAME, secrets.token_bytes(32))
        if value is not None:
            return value


async def create(state: AppState, key_id: int, extension: str) -> UploadRow:
    return await aq.insert_upload(
        state.pool, uuid.uuid4(), key_id, extension, state.settings.upload_url_expiry_s
    )


def _declared_length(request: Request, cap: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not (declared.isascii() and declared.isdigit()):
        raise InvalidHeader("invalid Content-Length header")
    if int(declared) > cap:
        raise PayloadTooLarge(f"an upload must be at most {cap} bytes")


async def receive(state: AppState, request: Request, ref: SignedRef, now: datetime) -> UploadRow:
    """Handle `PUT <upload url>`: stream the body into the slot; the completed slot."""
    row = verify(state.upload_secret, await aq.get_upload(state.pool, ref.upload_id), ref, now)
    check_media_type(request.headers.get("content-type"))
    cap = state.settings.max_upload_bytes
    _declared_length(request, cap)
    if row.state == "complete":
        raise UploadComplete()
    taken = await aq.begin_upload_write(state.pool, row.id)
    if taken is None:
        current = await aq.get_upload(state.pool, row.id)
        if current is not None and current.state == "complete":
            raise UploadComplete()
        raise UploadInProgress()
    final = file_path(state, taken)
    part = final.with_name(f".{final.name}.part")
    try:
        size = await _stream_to(request, part, cap, taken.extension)
        await anyio.to_thread.run_sync(os.replace, part, final)
        done = await aq.complete_upload(state.pool, taken.id, size)
        assert done is not None  # only this request holds the 'writing' slot
        return done
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        with contextlib.suppress(Exception):
            await aq.abandon_upload_write(state.pool, taken.id)
        raise


async def _stream_to(request: Request, part: Path, cap: int, extension: str) -> int:
    part.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    head = b""
    pending: list[bytes] = []
    pending_bytes = 0
    out: IO[bytes] = await anyio.to_thread.run_sync(part.open, "wb")
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise PayloadTooLarge(f"an upload must be at most {cap} bytes")
            if len(head) < 12:
                head = (head + chunk)[:12]
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= _WRITE_BYTES:
                await anyio.to_thread.run_sync(out.write, b"".join(pending))
                pending, pending_bytes = [], 0
        if pending:
            await anyio.to_thread.run_sync(out.write, b"".join(pending))
    finally:
        await anyio.to_thread.run_sync(out.close)
    if request.headers.get("content-length") not in (None, str(size)):
        # httptools stops at Content-Length, so only a connection cut short gets here.
        raise ClientDisconnect()
    if not sniff(extension, head):
        raise UnsupportedMediaType(f"the upload is not a .{extension} file")
    return size


async def for_submission(state: AppState, key_id: int, url: object) -> UploadRow:
    """The complete upload a submission's `URL` names, checked to belong to the same key.

    A tampered URL is 403; another key's upload is 404 (its existence is not revealed);
    an upload not completed yet is 409. An expired URL of a complete upload is still good:
    the expiry bounds when the file may be sent, and the file is kept for the retention period.
    """
    ref = parse_upload_url(url)
    row = await aq.get_upload(state.pool, ref.upload_id)
    if row is None:
        raise InvalidSignature()
    expected = sign(state.upload_secret, row.id, row.key_id, ref.expires)
    if not hmac.compare_digest(expected, ref.signature):
        raise InvalidSignature()
    if row.key_id != key_id:
        raise UploadNotFound("no such upload")
    if row.state != "complete":
        raise UploadIncomplete()
    return row


async def delete_stale(state: AppState, cutoff: datetime) -> int:
    """Delete uploads no request reads any more (and their files); how many went."""
    gone = await aq.delete_stale_uploads(state.pool, cutoff)
    folder = upload_dir(state)
    for upload_id, extension in gone:
        for name in (f"{upload_id}.{extension}", f".{upload_id}.{extension}.part"):
            with contextlib.suppress(OSError):
                await anyio.to_thread.run_sync((folder / name).unlink)
    return len(gone)
