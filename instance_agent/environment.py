"""A handler project's Python environment: its requirements.txt checked, hashed and located.

Pure (file reads only). Each distinct requirements.txt gets one virtualenv layered on the agent's
own packages (`control_plane/api_envs.py` builds it), found by the hash of its requirement lines
under `<apis root>/envs/<hash>/`; a project with no requirement lines runs in the agent's own
interpreter. A deployed version lives at `<apis root>/versions/<owner>/<name>/<version>/`, so its
environment is found from its folder alone (after a restart too).

A requirement must never replace the agent's torch: an unpinned `torch` is satisfied by the one
already installed, a pin to another version (which would pull a multi-GB CUDA build) is refused,
as are lines that point pip at another index.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REQUIREMENTS_FILE = "requirements.txt"
REQUIREMENTS_MAX_BYTES = 65_536
# <apis root>/versions/<owner>/<name>/<version>: the root is this many folders up.
_VERSION_DEPTH = 4
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
_INDEX_OPTIONS = ("--index-url", "--extra-index-url", "-i", "--trusted-host")
# Another requirements or constraints file would escape these checks (it may pin torch).
_NESTED_OPTIONS = ("-r", "--requirement", "-c", "--constraint")
# Packages whose builds are the agent's own: replacing them would break it or pull CUDA.
_PINNED_TO_AGENT = ("torch",)


class RequirementsRefused(ValueError):
    """A requirements.txt that must not be installed; the message says which line and why."""


@dataclass(frozen=True)
class Requirements:
    """The requirement lines of a project (comments and blanks dropped), in file order."""

    lines: tuple[str, ...]
    # Every line is a package the agent has already, unpinned or pinned to its version (the
    # seeds' `torch` and `transformers`): nothing to install, so no venv, and the instance is
    # forked from the zygote (~0.6 s) instead of a fresh interpreter importing torch (~8 s).
    satisfied: bool = False

    @property
    def sha256(self) -> str | None:
        """The environment's key; None when there is nothing to install."""
        if not self.lines or self.satisfied:
            return None
        return hashlib.sha256("\n".join(self.lines).encode()).hexdigest()


_PLAIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([A-Za-z0-9.+!_-]+))?$")


def _has_already(line: str) -> bool:
    match = _PLAIN.match(line)
    if match is None:
        return False
    have = installed_version(match.group(1))
    want = match.group(2)
    return have is not None and (want is None or want in (have, have.split("+")[0]))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(package: str) -> str | None:
    """The version of `package` in this interpreter, read from its metadata (never imported)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _check_pinned(line: str, name: str, rest: str, have: str | None) -> None:
    rest = rest.split(";", 1)[0].strip()
    if not rest:
        return  # satisfied by the agent's own build
    if have is not None and rest.replace(" ", "") in (f"=={have}", f"=={have.split('+')[0]}"):
        return
    present = f"the installed {have}" if have else "the agent's own build"
    raise RequirementsRefused(
        f"requirements.txt: {line!r}: {name} must be left unpinned or pinned to {present} "
        f"(another {name} build would replace the agent's and may pull a CUDA build)"
    )


def parse_requirements(text: str, pinned: dict[str, str | None] | None = None) -> Requirements:
    """Check a requirements.txt; `pinned` maps the agent's packages to their versions."""
    if len(text.encode()) > REQUIREMENTS_MAX_BYTES:
        raise RequirementsRefused("requirements.txt is larger than 64 KiB")
    if pinned is None:
        pinned = {name: installed_version(name) for name in _PINNED_TO_AGENT}
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        option = line.split("=", 1)[0].split(" ", 1)[0]
        if option in _INDEX_OPTIONS:
            raise RequirementsRefused(
                f"requirements.txt: {line!r}: other package indexes are not allowed (they are "
                "how a CUDA torch gets pulled); use the default index"
            )
        if option in _NESTED_OPTIONS:
            raise RequirementsRefused(
                f"requirements.txt: {line!r}: list the requirements in requirements.txt itself "
                "(nested requirement or constraint files are not read)"
            )
        match = _NAME.match(line)
        if match and not line.startswith("-"):
            name = _canonical(match.group(1))
            if name in pinned:
                _check_pinned(line, name, match.group(3), pinned[name])
        lines.append(line)
    return Requirements(tuple(lines), all(_has_already(line) for line in lines))


def read_requirements(project_dir: Path) -> Requirements:
    """The project's requirements.txt checked (none: nothing to install)."""
    path = project_dir / REQUIREMENTS_FILE
    if not path.is_file():
        return Requirements(())
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RequirementsRefused(f"requirements.txt cannot be read: {exc}") from exc
    return parse_requirements(text)


def env_dir(apis_root: Path, requirements_sha256: str) -> Path:
    """The virtualenv of one requirements hash."""
    return apis_root / "envs" / requirements_sha256


def env_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def python_for_version(version_dir: Path) -> str | None:
    """The interpreter a stored version runs under: its environment's, or None (the agent's)."""
    try:
        requirements = read_requirements(version_dir)
    except RequirementsRefused:
        return None  # refused at deploy; never stored
    digest = requirements.sha256
    if digest is None:
        return None
    return str(env_python(env_dir(version_dir.parents[_VERSION_DEPTH - 1], digest)))
