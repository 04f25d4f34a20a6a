"""Bad deploys (issue 11): every one refused with its status and code, none a 500, nothing left
half-deployed (no API row, no catalog model, no version folder, nothing in incoming/).

One control plane for the module, with MLCP_MAX_PROJECT_BYTES at 1 MiB so the size cases are
cheap; the archives are built here member by member, as a hostile client would.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator

import pytest

from tests.harness import (
    ADMIN_KEY,
    Api,
    app_state,
    own_control_plane,
)

CAP = 1 << 20
MAIN = b"from instance_agent.handler import handler\n\n@handler\ndef h(inputs, _):\n    return 1\n"


def spec(name: str = "bad-api", extra: str = "", path: str = "src/main.py") -> bytes:
    return f"name: {name}\nhandler: {{type: python, path: {path}}}\n{extra}".encode()


Member = tuple[str, bytes, bytes, dict[str, object]]


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs: object) -> Member:
    return (name, data, kind, attrs)


def archive(*members: Member, base: bool = True, compress: bool = True) -> bytes:
    """A tar.gz of the base project (spec, handler) plus `members`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        items = [member("mlcp.yaml", spec()), member("src/main.py", MAIN)] if base else []
        for name, data, kind, attrs in [*items, *members]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    return gzip.compress(raw) if compress else raw


def manifest(body: object) -> Member:
    return member(".mlcp-weights.json", json.dumps(body).encode())


def _with_spec(text: bytes) -> bytes:
    return archive(member("mlcp.yaml", text), member("src/main.py", MAIN), base=False)


def _with_requirements(text: str) -> bytes:
    return archive(member("requirements.txt", text.encode()))


MISSING = "ab" * 32
# name → (archive, URL name, status, code)
CASES: dict[str, tuple[bytes, str, int, str]] = {
    "parent path": (archive(member("../evil.py", b"x")), "bad-api", 422, "invalid_project"),
    "nested parent path": (
        archive(member("src/../../evil.py", b"x")),
        "bad-api",
        422,
        "invalid_project",
    ),
    "absolute path": (archive(member("/tmp/evil.py", b"x")), "bad-api", 422, "invalid_project"),
    "symlink out": (
        archive(member("src/passwd", kind=tarfile.SYMTYPE, linkname="/etc/passwd")),
        "bad-api",
        422,
        "invalid_project",
    ),
    "symlink up": (
        archive(member("src/up", kind=tarfile.SYMTYPE, linkname="../../..")),
        "bad-api",
        422,
        "invalid_project",
    ),
    "symlink inside": (
        archive(member("src/again.py", kind=tarfile.SYMTYPE, linkname="main.py")),
        "bad-api",
        422,
        "invalid_project",
    ),
    "hard link": (
        archive(member("src/hard.py", kind=tarfile.LNKTYPE, linkname="/etc/passwd")),
        "bad-api",
        422,
        "invalid_project",
    ),
    "character device": (
        archive(member("dev/null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)),
        "bad-api",
        422,
        "invalid_project",
    ),
    "block device": (
        archive(member("dev/sda", kind=tarfile.BLKTYPE, devmajor=8, devminor=0)),
        "bad-api",
        422,
        "invalid_project",
    ),
    "fifo": (archive(member("src/pipe", kind=tarfile.FIFOTYPE)), "bad-api", 422, "invalid_project"),
    "duplicate member": (
        archive(member("src/main.py", b"print(2)\n")),
        "bad-api",
        422,
        "invalid_project",
    ),
    "file under a file": (
        archive(member("src/main.py/x.py", b"x")),
        "bad-api",
        422,
        "invalid_project",
    ),
    "truncated gzip": (archive()[:-40], "bad-api", 422, "invalid_project"),
    "half a gzip": (archive()[: len(archive()) // 2], "bad-api", 422, "invalid_project"),
    "not gzip": (b"just some text, not an archive", "bad-api", 422, "invalid_project"),
    "plain tar": (archive(compress=False), "bad-api", 422, "invalid_project"),
    "empty body": (b"", "bad-api", 422, "invalid_project"),
    "gzip bomb": (
        archive(member("model/zeros.bin", b"\0" * (CAP + 1))),
        "bad-api",
        413,
        "payload_too_large",
    ),
    "missing blob": (
        archive(manifest({"model/w.safetensors": MISSING})),
        "bad-api",
        422,
        "missing_blob",
    ),
    "manifest outside model/": (
        archive(manifest({"src/evil.py": MISSING})),
        "bad-api",
        422,
        "invalid_project",
    ),
    "manifest parent path": (
        archive(manifest({"model/../../evil": MISSING})),
        "bad-api",
        422,
        "invalid_project",
    ),
    "manifest bad hash": (
        archive(manifest({"model/w.bin": "not-a-hash"})),
        "bad-api",
        422,
        "invalid_project",
    ),
    "manifest not an object": (archive(manifest([1, 2])), "bad-api", 422, "invalid_project"),
    "no spec": (archive(member("src/main.py", MAIN), base=False), "bad-api", 422, "invalid_spec"),
    "unknown kind": (_with_spec(spec(extra="kind: BatchAPI\n")), "bad-api", 422, "invalid_spec"),
    "handler outside": (_with_spec(spec(path="../main.py")), "bad-api", 422, "invalid_spec"),
    "handler absolute": (_with_spec(spec(path="/etc/main.py")), "bad-api", 422, "invalid_spec"),
    "handler missing": (_with_spec(spec(path="src/other.py")), "bad-api", 422, "invalid_spec"),
    "handler not python": (_with_spec(spec(path="src/main.sh")), "bad-api", 422, "invalid_spec"),
    "spec not yaml": (_with_spec(b"name: [bad\n"), "bad-api", 422, "invalid_spec"),
    "spec names another API": (_with_spec(spec("other-api")), "bad-api", 422, "invalid_spec"),
    "spec unknown key": (_with_spec(spec(extra="replicas: 3\n")), "bad-api", 422, "invalid_spec"),
    "spec bad concurrency": (
        _with_spec(spec(extra="concurrency: 0\n")),
        "bad-api",
        422,
        "invalid_spec",
    ),
    "reserved name": (_with_spec(spec("model")), "model", 422, "invalid_api_name"),
    "reserved name apis": (_with_spec(spec("apis")), "apis", 422, "invalid_api_name"),
    "invalid name": (_with_spec(spec()), "Bad_Name", 422, "invalid_api_name"),
    "name too long": (_with_spec(spec()), "a" * 64, 422, "invalid_api_name"),
    "another index": (
        _with_requirements("--index-url https://example.invalid/simple\nnumpy\n"),
        "bad-api",
        422,
        "invalid_requirements",
    ),
    "extra index": (
        _with_requirements("--extra-index-url https://download.pytorch.org/whl/cu121\n"),
        "bad-api",
        422,
        "invalid_requirements",
    ),
    "a CUDA torch": (
        _with_requirements("torch==2.1.0+cu121\n"),
        "bad-api",
        422,
        "invalid_requirements",
    ),
    "another torch": (_with_requirements("torch>=3\n"), "bad-api", 422, "invalid_requirements"),
}


@pytest.fixture(scope="module")
async def served(
    pg_dsn: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Api]:
    data = tmp_path_factory.mktemp("apis-bad")
    async with own_control_plane(
        pg_dsn, template_db, data, include_packaged_models=False, max_project_bytes=CAP
    ) as api:
        yield api


@pytest.fixture(scope="module")
async def key(served: Api) -> str:
    status, body = await served.call("POST", "/admin/keys", {"name": "mallory", "scope": "user"})
    assert status == 201, body
    return str(body["key"])


async def assert_nothing_left(api: Api, key: str) -> None:
    state = app_state(api)
    assert await state.pool.fetchval("SELECT count(*) FROM apis") == 0
    assert await state.pool.fetchval("SELECT count(*) FROM models WHERE source_kind = 'apis'") == 0
    root = api.settings.data_dir / "apis"
    assert not (root / "versions").exists() or not any((root / "versions").rglob("*"))
    assert not (root / "incoming").exists() or not any((root / "incoming").iterdir())
    status, listed = await api.call("GET", "/apis", key=key)
    assert (status, listed) == (200, [])


async def put(
    api: Api, path: str, data: bytes, key: str, content_type: str
) -> tuple[int, dict[str, object]]:
    headers = {**api.headers(key), "Content-Type": content_type}
    async with api.session.put(api.base + path, data=data, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_bad_project_is_refused_whole(served: Api, key: str, case: str) -> None:
    data, name, want_status, want_code = CASES[case]
    status, body = await put(served, f"/apis/{name}", data, key, "application/gzip")
    assert (status, body["code"]) == (want_status, want_code), body
    assert isinstance(body["error"], str) and body["error"]
    await assert_nothing_left(served, key)


async def _chunks(total: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\0" * 65536
        sent += 65536


@pytest.mark.parametrize("path", ["/apis/bad-api", f"/apis/blobs/{MISSING}"])
async def test_an_upload_over_the_cap_is_cut_off_while_it_streams(
    served: Api, key: str, path: str
) -> None:
    # No Content-Length (chunked): only counting the bytes can stop it.
    headers = {**served.headers(key), "Content-Type": "application/octet-stream"}
    async with served.session.put(
        served.base + path, data=_chunks(CAP + 65536), headers=headers
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["code"] == "payload_too_large"
    await assert_nothing_left(served, key)


async def test_a_claimed_3_gib_upload_is_refused_before_it_is_read(served: Api, key: str) -> None:
    host, port = served.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"PUT /apis/bad-api HTTP/1.1\r\nHost: x\r\nAuthorization: Key {key}\r\n"
        f"Content-Type: application/gzip\r\nContent-Length: {3 << 30}\r\n\r\n".encode()
        + b"\x1f\x8b"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head
    await assert_nothing_left(served, key)


async def test_blobs_are_checked_by_their_hash(served: Api, key: str) -> None:
    data = b"weights " * 100
    digest = hashlib.sha256(data).hexdigest()
    status, body = await put(
        served, f"/apis/blobs/{MISSING}", data, key, "application/octet-stream"
    )
    assert (status, body["code"]) == (422, "blob_hash_mismatch"), body
    status, body = await put(
        served, "/apis/blobs/NOT-A-HASH", data, key, "application/octet-stream"
    )
    assert (status, body["code"]) == (422, "invalid_field"), body
    assert (await served.call("HEAD", f"/apis/blobs/{digest}", key=key))[0] == 404
    status, body = await put(served, f"/apis/blobs/{digest}", data, key, "application/octet-stream")
    assert (status, body) == (201, {"sha256": digest, "size": len(data)})
    status, body = await put(served, f"/apis/blobs/{digest}", data, key, "application/octet-stream")
    assert (status, body) == (200, {"sha256": digest, "size": len(data)})
    assert (await served.call("HEAD", f"/apis/blobs/{digest}", key=key))[0] == 200
    assert (await served.call("HEAD", f"/apis/blobs/{digest}", key=None))[0] == 401


async def test_requests_that_are_not_deploys(served: Api, key: str) -> None:
    status, body = await put(served, "/apis/bad-api", archive(), key, "application/json")
    assert (status, body["code"]) == (415, "unsupported_media_type"), body
    status, body = await put(served, "/apis/bad-api", archive(), "", "application/gzip")
    assert (status, body["code"]) == (401, "unauthorized"), body
    # The bootstrap admin key's name ("bootstrap admin") cannot be an owner in a model id.
    status, body = await put(served, "/apis/bad-api", archive(), ADMIN_KEY, "application/gzip")
    assert (status, body["code"]) == (422, "invalid_api_name"), body
    status, body = await served.call("GET", "/apis/bad-api", key=key)
    assert (status, body["code"]) == (404, "api_not_found"), body
    status, body = await served.call("DELETE", "/apis/bad-api", key=key)
    assert (status, body["code"]) == (404, "api_not_found"), body
    await assert_nothing_left(served, key)


def test_there_are_at_least_thirty_bad_inputs() -> None:
    assert len(CASES) >= 30
