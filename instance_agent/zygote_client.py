"""The client side of the agent fork server (`instance_agent.zygote`).

One zygote per process runtime, started in the background when the runtime is warmed up and
again whenever it is found dead, so a crash costs one slower cold start, never a failed load.
The benchmarker forks its measuring agents from the same zygote, so a model is measured in the
very kind of process its instances run in (`benchmarker.measure`).
Each forked instance is a `ZygoteChild`: its pid at once, its exit code when the zygote reports
it on the child's own connection. If the zygote dies first the exit code is lost (`orphaned`)
and the runtime falls back to asking the OS, as for an instance adopted after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

READY_LINE = b"mlcp-zygote: ready"
# Importing torch and transformers: ~6 s on a quiet 2-core box, several times that when busy.
READY_TIMEOUT_S = 180.0
_FORK_TIMEOUT_S = 15.0
_STOP_GRACE_S = 5.0


class ZygoteUnavailable(Exception):
    """The zygote could not be started or did not fork the child."""


class ZygoteChild:
    """An instance forked by the zygote: a pid now, an exit code when the zygote reports one."""

    def __init__(self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.pid = pid
        self.returncode: int | None = None
        # The zygote died before the child: its exit code will never arrive.
        self.orphaned = False
        self._done = asyncio.Event()
        self._watch = asyncio.create_task(self._watch_exit(reader, writer))

    async def _watch_exit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            message = json.loads(line) if line else None
            if isinstance(message, dict) and isinstance(message.get("exit"), int):
                self.returncode = message["exit"]
            else:
                self.orphaned = True
        except (OSError, ValueError):
            self.orphaned = True
        finally:
            writer.close()
            self._done.set()

    async def wait(self) -> int | None:
        """The exit code once the child ends (None when orphaned)."""
        await self._done.wait()
        return self.returncode

    def detach(self) -> None:
        self._watch.cancel()


class Zygote:
    """Starts, restarts and asks the fork server; `spawn` forks one agent."""

    def __init__(self, run_dir: Path, env: dict[str, str], log_path: Path) -> None:
        self.socket_path = run_dir / "zygote.sock"
        self._run_dir = run_dir
        self._env = env
        self._log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        """The running zygote's pid (None before the first start or after it died)."""
        if self._proc is None or self._proc.returncode is not None:
            return None
        return self._proc.pid

    async def ensure_started(self) -> None:
        """Start the zygote unless one is running; return once it listens."""
        async with self._lock:
            if self.pid is not None:
                return
            self._run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._log_path.open("ab") as log:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "instance_agent",
                        "zygote",
                        "--socket",
                        str(self.socket_path),
                        stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=log,
                        env=self._env,
                        # Its own group: stopping an instance's group never reaches it.
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise ZygoteUnavailable(f"could not start: {exc.strerror}") from exc
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
            except TimeoutError:
                line = b""
            except BaseException:
                # Cancelled while it imports (the control plane stopping within its first
                # seconds): not ours yet, so `close` would not end it; it must not outlive us.
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
            if line.strip() != READY_LINE:
                await _end(proc)
                raise ZygoteUnavailable("did not become ready; see " + str(self._log_path))
            self._proc = proc
            logger.info("agent zygote %d ready", proc.pid)

    async def spawn(
        self, argv: list[str], env: dict[str, str], log: Path, *, die_with_zygote: bool = False
    ) -> ZygoteChild:
        """Fork one agent running `serve` with `argv`; a dead zygote is restarted first.

        With `die_with_zygote` the kernel kills the child when the zygote exits (which it does
        when its owner does): for a measuring agent, which must not outlive its measurer, unlike
        an instance.
        """
        request: dict[str, object] = {
            "argv": argv,
            "env": env,
            "log": str(log),
            "cwd": str(Path.cwd()),
        }
        if die_with_zygote:
            request["die_with_zygote"] = True
        for attempt in (1, 2):
            await self.ensure_started()
            try:
                return await self._fork(request)
            except (OSError, ValueError, TimeoutError) as exc:
                logger.warning("agent zygote did not fork (attempt %d): %s", attempt, exc)
                await self._forget_dead()
        raise ZygoteUnavailable("the zygote did not fork the instance")

    async def _fork(self, request: Mapping[str, object]) -> ZygoteChild:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(self.socket_path)), _FORK_TIMEOUT_S
        )
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), _FORK_TIMEOUT_S)
            line = await asyncio.wait_for(reader.readline(), _FORK_TIMEOUT_S)
            reply = json.loads(line) if line else None
            if not isinstance(reply, dict) or not isinstance(reply.get("pid"), int):
                raise ValueError("no pid in the zygote's reply")
        except BaseException:
            writer.close()
            raise
        return ZygoteChild(reply["pid"], reader, writer)

    async def _forget_dead(self) -> None:
        """After a failed fork: end a zygote that is hung so the next attempt starts afresh."""
        async with self._lock:
            if self._proc is not None:
                await _end(self._proc)
                self._proc = None

    async def close(self) -> None:
        """Stop the zygote (its children, the instances, keep running)."""
        async with self._lock:
            if self._proc is not None:
                await _end(self._proc)
                self._proc = None


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None:
        proc.stdin.close()  # end of file: the zygote exits by itself
    try:
        await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
