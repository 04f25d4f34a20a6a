"""Deploying a project over HTTP as the contract has it (the mlcp CLI does the same): the code
as a tar.gz without model/, each weight file as a blob by its SHA-256, a manifest naming them."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from tests.harness import Api

MANIFEST = ".mlcp-weights.json"


def pack(project: Path) -> tuple[bytes, dict[str, Path]]:
    """The code's tar.gz (manifest included) and the weight files by SHA-256."""
    blobs: dict[str, Path] = {}
    manifest: dict[str, str] = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(project.rglob("*")):
            rel = path.relative_to(project).as_posix()
            if rel == "model" or rel.startswith("model/"):
                if path.is_file():
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    manifest[rel] = digest
                    blobs[digest] = path
                continue
            if "__pycache__" in rel:
                continue
            tar.add(path, arcname=rel, recursive=False)
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), blobs


def targz(members: dict[str, bytes]) -> bytes:
    """A tar.gz of regular files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def deploy(
    api: Api, project: Path, key: str, *, name: str | None = None, spec: str | None = None
) -> tuple[int, Any]:
    """Upload the blobs the server lacks, then PUT the code."""
    archive, blobs = pack(project)
    for digest, path in blobs.items():
        status, _ = await api.call("HEAD", f"/apis/blobs/{digest}", key=key)
        if status == 404:
            status, body = await api.call(
                "PUT", f"/apis/blobs/{digest}", key=key, data=path.read_bytes()
            )
            assert status == 201, body
    query = f"?spec={spec}" if spec else ""
    return await api.call(
        "PUT",
        f"/apis/{name or project.name}{query}",
        key=key,
        data=archive,
        headers={"Content-Type": "application/gzip"},
    )


async def wait_api(
    api: Api, name: str, key: str, want: str, *, version: int | None = None, timeout_s: float = 120
) -> dict[str, Any]:
    """Poll GET /apis/{name} until its status is `want` (and its version `version`)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    body: Any = None
    while asyncio.get_running_loop().time() < deadline:
        status, body = await api.call("GET", f"/apis/{name}", key=key)
        assert status == 200, body
        if body["status"] == "failed" and want != "failed":
            raise AssertionError(f"{name} failed: {body['reason']}")
        if body["status"] == want and (version is None or body["version"] == version):
            return dict(body)
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} never reached {want}: last {body}")
