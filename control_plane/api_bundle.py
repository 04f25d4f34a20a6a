"""A deployed project's files: weight blobs by content, the code's tar.gz unpacked safely.

Layout under `MLCP_DATA_DIR/apis/`:

    blobs/<sha256>                          a weight file, stored once whoever uploads it
    versions/<owner>/<name>/<version>/      a version's project; model/ files hard-linked to blobs
    envs/<requirements sha256>/             virtualenvs (control_plane/api_envs.py)
    incoming/                               uploads and unpacking in progress (removed after)

Every size is counted while the bytes arrive (a Content-Length is a claim, not a fact) and while
the archive is unpacked (a gzip bomb stops at the cap). An archive is refused whole, leaving
nothing behind, for a member with an absolute path or `..`, any link (symbolic or hard), a
device, FIFO or other special file, a duplicate path, or a truncated or corrupt stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import anyio.to_thread

from control_plane.errors import (
    BlobHashMismatch,
    InvalidHeader,
    InvalidProject,
    MissingBlob,
    PayloadTooLarge,
)

WEIGHTS_MANIFEST = ".mlcp-weights.json"
MANIFEST_MAX_BYTES = 4 << 20
MAX_MEMBERS = 20_000
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_WRITE_BYTES = 1 << 20
_COPY_BYTES = 1 << 20


def apis_root(data_dir: Path) -> Path:
    return data_dir / "apis"


def blob_path(root: Path, sha256: str) -> Path:
    """Where a blob lies; `sha256` must have been checked against SHA256."""
    return root / "blobs" / sha256


def version_dir(root: Path, owner: str, name: str, version: int) -> Path:
    return root / "versions" / owner / name / str(version)


def check_declared_length(value: str | None, cap: int, what: str) -> None:
    """A Content-Length over the cap is refused before a byte is read."""
    if value is None:
        return
    if not (value.isascii() and value.isdigit()):
        raise InvalidHeader("invalid Content-Length header")
    if int(value) > cap:
        raise PayloadTooLarge(f"{what} must be at most {cap} bytes")


@dataclass(frozen=True)
class Received:
    path: Path
    size: int
    sha256: str


async def receive(chunks: AsyncIterator[bytes], dest: Path, cap: int, what: str) -> Received:
    """Stream a body into `dest` (a new file), hashing and counting it; removed on failure."""
    await anyio.to_thread.run_sync(lambda: dest.parent.mkdir(parents=True, exist_ok=True))
    digest = hashlib.sha256()
    size = 0
    pending: list[bytes] = []
    pending_bytes = 0
    out: IO[bytes] = await anyio.to_thread.run_sync(dest.open, "xb")
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > cap:
                raise PayloadTooLarge(f"{what} must be at most {cap} bytes")
            digest.update(chunk)
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= _WRITE_BYTES:
                await anyio.to_thread.run_sync(out.write, b"".join(pending))
                pending, pending_bytes = [], 0
        if pending:
            await anyio.to_thread.run_sync(out.write, b"".join(pending))
        await anyio.to_thread.run_sync(out.close)
    except BaseException:
        await anyio.to_thread.run_sync(out.close)
        await anyio.to_thread.run_sync(remove, dest)
        raise
    return Received(dest, size, digest.hexdigest())


def store_blob(root: Path, received: Received, claimed: str) -> bool:
    """Move a received blob into place; True when it was not stored before."""
    if received.sha256 != claimed:
        received.path.unlink(missing_ok=True)
        raise BlobHashMismatch(f"the uploaded bytes have SHA-256 {received.sha256}, not {claimed}")
    final = blob_path(root, claimed)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file():
        received.path.unlink(missing_ok=True)
        return False
    # Read-only: every version links the same inode, so no handler may change another's weights.
    os.chmod(received.path, 0o444)
    os.replace(received.path, final)
    return True


def _member_path(name: str) -> PurePosixPath | None:
    """A member's safe relative path; None for the archive's root ('.', './')."""
    if "\0" in name or "\\" in name:
        raise InvalidProject(f"the archive member {name[:200]!r} has an invalid name")
    pure = PurePosixPath(name)
    if pure.is_absolute():
        raise InvalidProject(f"the archive member {name[:200]!r} has an absolute path")
    parts = [p for p in pure.parts if p != "."]
    if ".." in parts:
        raise InvalidProject(f"the archive member {name[:200]!r} leaves the project ('..')")
    if not parts:
        return None
    return PurePosixPath(*parts)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return "link"
    if member.isdev() or member.isfifo():
        return "device or FIFO"
    return "special file"


def _copy(src: IO[bytes], dest: Path, mode: int, budget: list[int], cap: int) -> None:
    with dest.open("xb") as out:
        while chunk := src.read(_COPY_BYTES):
            budget[0] += len(chunk)
            if budget[0] > cap:
                raise PayloadTooLarge(f"the unpacked project must be at most {cap} bytes")
            out.write(chunk)
    os.chmod(dest, 0o755 if mode & stat.S_IXUSR else 0o644)


def unpack(archive: Path, dest: Path, cap: int) -> None:
    """Unpack a project tar.gz into the new folder `dest`; InvalidProject/PayloadTooLarge."""
    dest.mkdir(parents=True)
    seen: set[PurePosixPath] = set()
    budget = [0]
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise InvalidProject(f"the archive holds more than {MAX_MEMBERS} entries")
                rel = _member_path(member.name)
                if rel is None:
                    continue
                if rel in seen:
                    raise InvalidProject(f"the archive holds {str(rel)[:200]!r} twice")
                seen.add(rel)
                target = dest.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise InvalidProject(
                        f"the archive member {str(rel)[:200]!r} is a {_kind(member)}; a project "
                        "holds regular files and folders only"
                    )
                if target.parent.exists() and not target.parent.is_dir():
                    raise InvalidProject(f"{str(rel)[:200]!r} lies under a file")
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None  # a regular file
                _copy(src, target, member.mode, budget, cap)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, FileExistsError):
            raise InvalidProject("the archive holds a path twice") from exc
        raise InvalidProject(
            f"the upload is not a complete tar.gz (truncated or corrupt): {type(exc).__name__}"
        ) from exc


def read_manifest(project: Path) -> dict[str, str]:
    """The weights manifest `{"model/...": sha256}` at the project's root (removed from it)."""
    path = project / WEIGHTS_MANIFEST
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > MANIFEST_MAX_BYTES:
            raise InvalidProject(f"{WEIGHTS_MANIFEST} is larger than 4 MiB")
        body = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidProject(f"{WEIGHTS_MANIFEST} is not JSON") from exc
    path.unlink()
    if not isinstance(body, dict):
        raise InvalidProject(f'{WEIGHTS_MANIFEST} must map "model/<path>" to a SHA-256')
    out: dict[str, str] = {}
    for key, digest in body.items():
        rel = _member_path(key) if isinstance(key, str) else None
        if rel is None or len(rel.parts) < 2 or rel.parts[0] != "model":
            raise InvalidProject(f"{WEIGHTS_MANIFEST}: {str(key)[:200]!r} is not a path in model/")
        if not isinstance(digest, str) or not SHA256.match(digest):
            raise InvalidProject(f"{WEIGHTS_MANIFEST}: {key!r} needs a lowercase hex SHA-256")
        out[str(rel)] = digest
    return out


def link_weights(root: Path, project: Path, manifest: dict[str, str]) -> int:
    """Hard-link (or copy, across file systems) each listed blob into the project; total bytes."""
    missing = sorted({d for d in manifest.values() if not blob_path(root, d).is_file()})
    if missing:
        raise MissingBlob(
            "these weight files were not uploaded (PUT /apis/blobs/{sha256}): " + ", ".join(missing)
        )
    total = 0
    for rel, digest in sorted(manifest.items()):
        target = project.joinpath(*PurePosixPath(rel).parts)
        if target.exists() or target.is_symlink():
            raise InvalidProject(f"{rel!r} is both in the archive and in {WEIGHTS_MANIFEST}")
        if target.parent.exists() and not target.parent.is_dir():
            raise InvalidProject(f"{rel!r} lies under a file")
        target.parent.mkdir(parents=True, exist_ok=True)
        source = blob_path(root, digest)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        total += target.stat().st_size
    return total


def weights_bytes(project: Path) -> int | None:
    sizes = [p.stat().st_size for p in (project / "model").rglob("*.safetensors") if p.is_file()]
    return sum(sizes) if sizes else None


def remove_unlinked_blobs(root: Path, digests: list[str]) -> list[str]:
    """Remove the blobs among `digests` that no version links; those gone (or already missing).

    A version's weights are hard links to their blobs, so a blob's link count says whether any
    version (stored, or being unpacked under incoming/) still holds it. One that was copied
    across file systems holds its own bytes and does not need the blob.
    """
    gone: list[str] = []
    for digest in digests:
        path = blob_path(root, digest)
        try:
            if path.stat().st_nlink > 1:
                continue
            path.unlink()
        except FileNotFoundError:
            pass
        gone.append(digest)
    return gone


def incoming(root: Path) -> Path:
    """A fresh, unique path under `incoming/` for one upload or unpacking."""
    return root / "incoming" / uuid.uuid4().hex


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
