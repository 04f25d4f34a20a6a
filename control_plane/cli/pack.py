"""A handler project packed for `PUT /apis/{name}`: the code as a tar.gz, the weights apart.

Every file under `model/` is a blob named by its sha256 (hashed streaming), uploaded once per
content; the code tarball holds the rest plus `.mlcp-weights.json` (`{"model/rel": sha256}`).
Links that stay inside the project are packed as the files they point at; links that leave it,
link loops and special files (devices, FIFOs, sockets) are refused. `.git`, `__pycache__` and
`.venv` folders are skipped. The whole project (code and weights) is capped at
`MLCP_MAX_PROJECT_BYTES` (default 2 GiB), checked from the sizes before anything is read.

The tarball is deterministic (sorted members, no owners or times, gzip without a timestamp):
an unchanged project packs to the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from control_plane.cli.client import CliError
from instance_agent.project import SPEC_FILE, InvalidSpec, ProjectSpec, parse_spec

WEIGHTS_DIR = "model"
WEIGHTS_INDEX = ".mlcp-weights.json"
SKIPPED_DIRS = frozenset({".git", "__pycache__", ".venv"})
DEFAULT_MAX_PROJECT_BYTES = 2 * 1024**3
MAX_PROJECT_BYTES_ENV = "MLCP_MAX_PROJECT_BYTES"
_CHUNK_BYTES = 1 << 20

Progress = Callable[[int], None]


class PackError(CliError):
    """The project cannot be packed; the message says which file and why."""


@dataclass(frozen=True)
class ProjectFile:
    """One regular file of the project: its path inside it (posix) and where it is read from."""

    rel: str
    source: Path
    size: int
    executable: bool


@dataclass(frozen=True)
class Blob:
    """A weights file: its path in the project, content hash and size."""

    rel: str
    source: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class Project:
    """A project found on disk, its spec checked, its files listed (nothing read yet)."""

    root: Path
    spec_file: str
    spec: ProjectSpec
    code: list[ProjectFile]
    weights: list[ProjectFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.code) + sum(f.size for f in self.weights)


def max_project_bytes(environ: dict[str, str] | None = None) -> int:
    """The cap from `MLCP_MAX_PROJECT_BYTES` (bytes), default 2 GiB."""
    raw = (os.environ if environ is None else environ).get(MAX_PROJECT_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PROJECT_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise PackError(f"{MAX_PROJECT_BYTES_ENV} must be a number of bytes, not {raw!r}")
    return int(raw)


def locate(target: Path) -> tuple[Path, str]:
    """The project folder and its spec's file name, from a folder or a spec file."""
    if target.is_file():
        if target.suffix not in (".yaml", ".yml"):
            raise PackError(f"{target} is not a .yaml spec")
        return target.resolve().parent, target.name
    if not target.is_dir():
        raise PackError(f"{target} does not exist: give a project folder or its spec file")
    if (target / SPEC_FILE).is_file():
        return target.resolve(), SPEC_FILE
    others = sorted(p.name for p in target.iterdir() if p.suffix in (".yaml", ".yml"))
    if len(others) != 1:
        found = f" (found {', '.join(others)}: name one)" if others else ""
        raise PackError(f"{target} has no {SPEC_FILE} nor exactly one other .yaml spec{found}")
    return target.resolve(), others[0]


def read_spec(root: Path, spec_file: str) -> ProjectSpec:
    """The spec parsed and checked as the agent will read it."""
    try:
        text = (root / spec_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PackError(f"cannot read {spec_file}: {exc}") from None
    try:
        spec = parse_spec(text)
    except InvalidSpec as exc:
        raise PackError(f"{spec_file}: {exc.message}") from None
    if not (root / spec.handler_path).is_file():
        raise PackError(f"{spec_file}: handler file {spec.handler_path} is not in the project")
    return spec


def _walk(root: Path, folder: Path, rel: str, chain: tuple[Path, ...]) -> list[ProjectFile]:
    """Regular files under `folder` (real path in `chain[-1]`), following links inside `root`."""
    found: list[ProjectFile] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise PackError(f"cannot read {rel or '.'}: {exc.strerror}") from None
    for name in names:
        path = folder / name
        inner = f"{rel}/{name}" if rel else name
        if name in SKIPPED_DIRS and path.is_dir():
            continue
        if path.is_symlink():
            real = path.resolve()
            if not real.is_relative_to(root):
                raise PackError(f"{inner} is a link to {real}, outside the project")
            if not real.exists():
                raise PackError(f"{inner} is a broken link")
        else:
            real = path
        try:
            info = real.stat()
        except OSError as exc:
            raise PackError(f"cannot read {inner}: {exc.strerror}") from None
        if stat.S_ISDIR(info.st_mode):
            resolved = real.resolve()
            if resolved in chain:
                raise PackError(f"{inner} is a link to a folder that contains it (a loop)")
            found += _walk(root, real, inner, (*chain, resolved))
        elif stat.S_ISREG(info.st_mode):
            executable = bool(info.st_mode & stat.S_IXUSR)
            found.append(ProjectFile(inner, real, info.st_size, executable))
        else:
            raise PackError(f"{inner} is not a regular file (a device, FIFO or socket)")
    return found


def scan(target: Path, *, max_bytes: int | None = None) -> Project:
    """Find the project at `target`, check its spec and list its files; check the size cap."""
    root, spec_file = locate(target)
    spec = read_spec(root, spec_file)
    files = _walk(root, root, "", (root,))
    if any(f.rel == WEIGHTS_INDEX for f in files):
        raise PackError(f"{WEIGHTS_INDEX} is a name mlcp uses: rename that file")
    prefix = WEIGHTS_DIR + "/"
    project = Project(
        root=root,
        spec_file=spec_file,
        spec=spec,
        code=[f for f in files if not f.rel.startswith(prefix)],
        weights=[f for f in files if f.rel.startswith(prefix)],
    )
    cap = max_project_bytes() if max_bytes is None else max_bytes
    if project.total_bytes > cap:
        largest = max(files, key=lambda f: f.size)
        raise PackError(
            f"the project is {project.total_bytes:,} bytes, over the {cap:,} that "
            f"{MAX_PROJECT_BYTES_ENV} allows (largest file: {largest.rel}, {largest.size:,} bytes)"
        )
    return project


def hash_file(source: Path, on_bytes: Progress | None = None) -> str:
    """The file's sha256, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with source.open("rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
    except OSError as exc:
        raise PackError(f"cannot read {source}: {exc.strerror}") from None
    return digest.hexdigest()


def hash_weights(project: Project, on_bytes: Progress | None = None) -> list[Blob]:
    """Every weights file with its content hash, in path order."""
    return [Blob(f.rel, f.source, hash_file(f.source, on_bytes), f.size) for f in project.weights]


def weights_index(blobs: list[Blob]) -> dict[str, str]:
    """`.mlcp-weights.json`'s content: each weights path and its sha256."""
    return {b.rel: b.sha256 for b in blobs}


def _member(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_code(project: Project, blobs: list[Blob], out: IO[bytes]) -> None:
    """Write the code tarball (tar.gz, deterministic) with `.mlcp-weights.json` into `out`."""
    index = json.dumps(weights_index(blobs), indent=1, sort_keys=True).encode()
    with (
        gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for f in sorted(project.code, key=lambda f: f.rel):
            try:
                with f.source.open("rb") as data:
                    tar.addfile(_member(f.rel, f.size, 0o755 if f.executable else 0o644), data)
            except OSError as exc:
                raise PackError(f"cannot read {f.rel}: {exc.strerror}") from None
        tar.addfile(_member(WEIGHTS_INDEX, len(index), 0o644), io.BytesIO(index))


def pack_code(project: Project, blobs: list[Blob]) -> bytes:
    """The code tarball as bytes (code is small: weights travel apart)."""
    buffer = io.BytesIO()
    write_code(project, blobs, buffer)
    return buffer.getvalue()
