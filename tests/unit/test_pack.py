"""Packing a handler project for deploy, on real folders: what goes in, what is refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from control_plane.cli import pack
from control_plane.cli.scaffold import write_project


def project(tmp_path: Path, name: str = "demo") -> Path:
    root = tmp_path / name
    write_project(root, name)
    return root


def members(code: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(code), mode="r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def read_member(code: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(code), mode="r:gz") as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def packed(target: Path, **kw: int) -> tuple[pack.Project, list[pack.Blob], bytes]:
    found = pack.scan(target, **kw)
    blobs = pack.hash_weights(found)
    return found, blobs, pack.pack_code(found, blobs)


def test_code_and_weights_travel_apart(tmp_path: Path) -> None:
    root = project(tmp_path)
    weights = os.urandom(3 * 1024 * 1024 + 17)  # more than one hashing chunk
    (root / "model" / "sub").mkdir()
    (root / "model" / "sub" / "weights.bin").write_bytes(weights)
    (root / "model" / "copy.bin").write_bytes(weights)
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    for skipped in (".git", "__pycache__", ".venv", "src/__pycache__"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "junk").write_text("x")
    seen: list[int] = []
    found = pack.scan(root)
    blobs = pack.hash_weights(found, seen.append)
    code = pack.pack_code(found, blobs)

    assert found.spec.name == "demo" and found.spec_file == "mlcp.yaml"
    names = members(code)
    assert sorted(names) == sorted(
        [
            ".mlcp-weights.json",
            "Dockerfile",
            "README.md",
            "mlcp.yaml",
            "requirements.txt",
            "run.sh",
            "src/main.py",
        ]
    )
    assert names["run.sh"].mode == 0o755 and names["mlcp.yaml"].mode == 0o644
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in names.values())
    index = json.loads(read_member(code, ".mlcp-weights.json"))
    digest = hashlib.sha256(weights).hexdigest()
    readme = hashlib.sha256((root / "model" / "README.md").read_bytes()).hexdigest()
    assert index == {
        "model/README.md": readme,
        "model/copy.bin": digest,
        "model/sub/weights.bin": digest,
    }
    assert sum(seen) == sum(b.size for b in blobs)
    assert {b.sha256 for b in blobs} == {digest, readme}  # two copies, one content
    # Deterministic: packing again gives the same bytes.
    assert packed(root)[2] == code


def test_a_link_inside_is_packed_as_its_file_and_one_outside_is_refused(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "src" / "labels.txt").write_text("Positive\nNegative\n")
    (root / "labels.txt").symlink_to("src/labels.txt")
    (root / "srclink").symlink_to("src", target_is_directory=True)
    _, _, code = packed(root)
    assert read_member(code, "labels.txt") == b"Positive\nNegative\n"
    assert not members(code)["labels.txt"].issym()
    assert "srclink/main.py" in members(code)

    (tmp_path / "secret").write_text("key")
    (root / "model" / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(pack.PackError, match=r"model/leak is a link to .*outside the project"):
        pack.scan(root)
    (root / "model" / "leak").unlink()
    (root / "src" / "up").symlink_to("..", target_is_directory=True)
    with pytest.raises(pack.PackError, match="loop"):
        pack.scan(root)
    (root / "src" / "up").unlink()
    (root / "dangling").symlink_to("nowhere")
    with pytest.raises(pack.PackError, match="dangling is a broken link"):
        pack.scan(root)


def test_special_files_and_the_reserved_index_name_are_refused(tmp_path: Path) -> None:
    root = project(tmp_path)
    os.mkfifo(root / "pipe")
    with pytest.raises(pack.PackError, match="pipe is not a regular file"):
        pack.scan(root)
    (root / "pipe").unlink()
    (root / ".mlcp-weights.json").write_text("{}")
    with pytest.raises(pack.PackError, match="rename that file"):
        pack.scan(root)


def test_the_size_cap_counts_code_and_weights(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "model" / "big.bin").write_bytes(b"\0" * 50_000)
    total = pack.scan(root).total_bytes
    assert total > 50_000
    assert pack.scan(root, max_bytes=total).total_bytes == total
    with pytest.raises(pack.PackError, match=r"over the 50,000 .*largest file: model/big.bin"):
        pack.scan(root, max_bytes=50_000)
    assert pack.max_project_bytes({}) == 2 * 1024**3
    assert pack.max_project_bytes({"MLCP_MAX_PROJECT_BYTES": "1000"}) == 1000
    for bad in ("lots", "-1", "0", "1.5"):
        with pytest.raises(pack.PackError, match="MLCP_MAX_PROJECT_BYTES"):
            pack.max_project_bytes({"MLCP_MAX_PROJECT_BYTES": bad})


def test_the_spec_is_found_and_checked(tmp_path: Path) -> None:
    cortex = tmp_path / "tg"
    write_project(cortex, "text-generator", "cortex")
    assert pack.scan(cortex).spec_file == "text_generator.yaml"
    assert pack.scan(cortex / "text_generator.yaml").spec.name == "text-generator"
    (cortex / "other.yaml").write_text("name: other\nhandler: {path: handler.py}\n")
    with pytest.raises(pack.PackError, match="name one"):
        pack.scan(cortex)
    assert pack.scan(cortex / "other.yaml").spec.name == "other"

    with pytest.raises(pack.PackError, match="does not exist"):
        pack.scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pack.PackError, match=r"no mlcp\.yaml"):
        pack.scan(tmp_path / "empty")
    with pytest.raises(pack.PackError, match=r"not a \.yaml spec"):
        pack.scan(cortex / "handler.py")

    root = project(tmp_path)
    spec = root / "mlcp.yaml"
    for text, needle in (
        ("name: model\nhandler: {path: src/main.py}\n", "reserved"),
        ("name: demo\nkind: BatchAPI\nhandler: {path: src/main.py}\n", "kind"),
        ("name: demo\nhandler: {path: ../outside.py}\n", "inside the project"),
        ("name: demo\nhandler: {path: src/absent.py}\n", "src/absent.py is not in the project"),
        ("name: [unclosed\n", "not valid YAML"),
    ):
        spec.write_text(text)
        with pytest.raises(pack.PackError, match=needle):
            pack.scan(root)
