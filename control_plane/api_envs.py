"""Building a handler project's virtualenv: one per distinct requirements.txt, cached by its hash.

The venv is made with the agent's interpreter (`python -m venv --system-site-packages
--without-pip`) and layered on the agent's own site-packages through a `.pth` file, so torch and
transformers already installed are reused instead of downloaded (the agent's interpreter is
often itself a venv, whose packages `--system-site-packages` alone would not see). pip is the
agent's, run against the new interpreter (`pip --python`), with a constraints file pinning torch
to the installed build, so no requirement can pull another torch in as a dependency either.

Built in place under a file lock (two control planes on one host build it once); a `.complete`
marker says it is whole. A failed build is removed and its reason is pip's last lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import shutil
import site
import sys
from pathlib import Path

import anyio.to_thread

from instance_agent.environment import (
    REQUIREMENTS_FILE,
    Requirements,
    env_dir,
    env_python,
    installed_version,
)

logger = logging.getLogger(__name__)

BUILD_TIMEOUT_S = 1800.0
COMPLETE_MARK = ".complete"
REASON_LINES = 12
_locks: dict[str, asyncio.Lock] = {}


class EnvBuildFailed(Exception):
    """The environment could not be built; the message is shown as the API's reason."""


def _layer_pth() -> str:
    """A .pth that appends the agent's site-packages (and processes their .pth files)."""
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    return "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n"


def _tail(output: bytes) -> str:
    lines = [ln for ln in output.decode("utf-8", "replace").splitlines() if ln.strip()]
    return "\n".join(lines[-REASON_LINES:]) or "no output"


async def _run(argv: list[str], cwd: Path, timeout_s: float) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out


def _write_layer(purelib: Path, folder: Path) -> Path:
    """The .pth onto the agent's packages, and the constraints file pinning torch; its path."""
    purelib.mkdir(parents=True, exist_ok=True)
    (purelib / "_mlcp_agent_layer.pth").write_text(_layer_pth())
    constraints = folder / "mlcp-constraints.txt"
    torch = installed_version("torch")
    constraints.write_text(f"torch=={torch}\n" if torch else "")
    return constraints


async def _build(folder: Path, project_dir: Path, timeout_s: float) -> None:
    code, out = await _run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder)],
        project_dir,
        60.0,
    )
    if code != 0:
        raise EnvBuildFailed(f"creating the virtualenv failed:\n{_tail(out)}")
    python = env_python(folder)
    code, out = await _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        project_dir,
        60.0,
    )
    if code != 0:
        raise EnvBuildFailed(f"the virtualenv's python does not run:\n{_tail(out)}")
    constraints = await anyio.to_thread.run_sync(_write_layer, Path(out.decode().strip()), folder)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        # A local source package builds with the agent's setuptools, offline, instead of
        # downloading a build backend into an isolated environment first.
        "--no-build-isolation",
        "-r",
        REQUIREMENTS_FILE,
        "-c",
        str(constraints),
    ]
    try:
        code, out = await _run(argv, project_dir, timeout_s)
    except TimeoutError as exc:
        raise EnvBuildFailed(f"pip install took longer than {timeout_s:g} s") from exc
    if code != 0:
        raise EnvBuildFailed(f"pip install -r requirements.txt failed:\n{_tail(out)}")
    (folder / COMPLETE_MARK).write_text("")


async def ensure_env(
    apis_root: Path,
    requirements: Requirements,
    project_dir: Path,
    *,
    timeout_s: float = BUILD_TIMEOUT_S,
) -> str | None:
    """The interpreter the project runs under, building its venv first if needed.

    None: nothing to install, the agent's own interpreter. Raises EnvBuildFailed.
    """
    digest = requirements.sha256
    if digest is None:
        return None
    folder = env_dir(apis_root, digest)
    python = str(env_python(folder))
    if (folder / COMPLETE_MARK).is_file():
        return python
    async with _locks.setdefault(digest, asyncio.Lock()):
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = await anyio.to_thread.run_sync(lambda: (folder.parent / f"{digest}.lock").open("a"))
        try:
            await anyio.to_thread.run_sync(fcntl.flock, lock.fileno(), fcntl.LOCK_EX)
            if (folder / COMPLETE_MARK).is_file():
                return python
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(folder, ignore_errors=True))
            logger.info("building the environment %s for %s", digest[:12], project_dir.name)
            try:
                await _build(folder, project_dir, timeout_s)
            except BaseException:
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(folder, ignore_errors=True))
                raise
        finally:
            lock.close()  # closing the file releases the flock
    return python
