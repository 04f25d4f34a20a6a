"""The `process` runtime: each instance agent is a subprocess in its own process group.

The instance is labelled through its environment (MLCP_INSTANCE=<id>:<generation>) so a control
plane that restarts can find its processes again; its output goes to a log file per instance.

The real agent is forked from a zygote that has torch and transformers imported already
(`instance_agent.zygote_client`), which takes the imports out of every cold start; a custom
agent command (tests' fake agents) or a zygote that cannot start falls back to a fresh
subprocess. A forked child's /proc environment and command line are the zygote's, so each one
is also recorded in a small file (`<pid>.json`: label, endpoint, start time) that `list` and
`exited` read after a restart. The records live in a folder per cluster under the host's
temporary directory, not under MLCP_DATA_DIR: every control plane of the cluster on this host must
see them, as it sees the environment labels of fresh processes, or its reconciler would take
another control plane's instances for gone ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from collections import deque
from pathlib import Path

import psutil

from control_plane.errors import RuntimeFailed
from control_plane.runtimes.base import Exited, InstanceSpec, Launched, Listed
from instance_agent.launch import free_loopback_port, load_failure, serve_command
from instance_agent.lease import DEFAULT_LEASE_GRACE_S, LEASE_ENV
from instance_agent.zygote_client import Zygote, ZygoteChild, ZygoteUnavailable

logger = logging.getLogger(__name__)

# <cluster>:<instance id>:<generation>
LABEL_ENV = "MLCP_INSTANCE"


_LABEL_PREFIX = f"{LABEL_ENV}=".encode()


def labelled_processes() -> list[tuple[int, str, list[str]]]:
    """(pid, label, command line) of the live processes whose environment has LABEL_ENV.

    Read from /proc where there is one: a bytes search of each environment, 10x cheaper than
    psutil parsing them all (8 ms for 77 processes here); psutil elsewhere.
    """
    if not os.path.isdir("/proc/self"):
        return _labelled_by_psutil()
    found: list[tuple[int, str, list[str]]] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
            if _LABEL_PREFIX not in environ:
                continue
            values = environ.split(b"\0")
            label = next((v for v in values if v.startswith(_LABEL_PREFIX)), b"")
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if label and state != b"Z":
            value = label[len(_LABEL_PREFIX) :].decode(errors="replace")
            found.append((int(entry.name), value, [c.decode(errors="replace") for c in cmd if c]))
    return found


def _labelled_by_psutil() -> list[tuple[int, str, list[str]]]:
    found: list[tuple[int, str, list[str]]] = []
    for p in psutil.process_iter(["pid", "environ", "cmdline"]):
        try:
            label = (p.info.get("environ") or {}).get(LABEL_ENV)
            if label and p.status() != psutil.STATUS_ZOMBIE:
                found.append((p.pid, label, list(p.info.get("cmdline") or [])))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        status = str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


async def _wait_gone(pid: int, timeout_s: float) -> None:
    """Until a process that is not our child has ended (or `timeout_s` passed).

    Woken by its pidfd, readable the moment it exits (Linux 5.3+), instead of polling: an
    evicted instance's memory is free only once it is gone and the load that evicted it waits
    for that. Polled every 20 ms where there is no pidfd.
    """
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while time.monotonic() < deadline and _alive(pid):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def on_exit() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended, max(0.0, deadline - time.monotonic()))
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def last_lines(path: Path, n: int) -> list[str]:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return list(deque((line.rstrip("\n") for line in fh), maxlen=n))
    except OSError:
        return []


def exit_reason(returncode: int, log_tail: list[str]) -> str:
    """A human reason for an agent's exit, preferring its own load-failure line."""
    for line in reversed(log_tail):
        if (reason := load_failure(line)) is not None:
            return "load failed: " + reason[:500]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"instance process was killed by {name}"
    return f"instance process exited with code {returncode}"


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def forked_records_dir(cluster: str) -> Path:
    """Where this host keeps the records of a cluster's forked instances (one per uid)."""
    safe = "".join(c for c in cluster if c.isalnum() or c in "-_") or "default"
    return Path(tempfile.gettempdir()) / f"mlcp-{os.getuid()}" / f"forked-{safe}"


class ProcessRuntime:
    name = "process"

    def __init__(
        self,
        log_dir: Path,
        *,
        cluster: str,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        lease_grace_s: float = DEFAULT_LEASE_GRACE_S,
        zygote: bool = True,
        records_dir: Path | None = None,
    ) -> None:
        self.lease_grace_s = lease_grace_s
        self.log_dir = log_dir
        self.cluster = cluster
        self.records_dir = records_dir or forked_records_dir(cluster)
        self._command = command
        self._env = env or {}
        self._procs: dict[int, asyncio.subprocess.Process | ZygoteChild] = {}
        # Only the real agent is forked: a custom command is some other program.
        self.zygote = (
            Zygote(log_dir / "zygote", self._base_env(), log_dir / "zygote.log")
            if zygote and command is None
            else None
        )
        self._warming: asyncio.Task[None] | None = None

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self._env)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def warm_up(self) -> None:
        """Start the zygote in the background, so the first load already forks."""
        if self.zygote is not None and self._warming is None:
            self._warming = asyncio.create_task(self._warm(self.zygote))

    @staticmethod
    async def _warm(zygote: Zygote) -> None:
        try:
            await zygote.ensure_started()
        except ZygoteUnavailable as exc:
            logger.warning("agent zygote: %s; instances start as fresh processes", exc)

    async def close(self) -> None:
        """Stop the zygote; instances keep running (a restart adopts them)."""
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming
        for proc in self._procs.values():
            if isinstance(proc, ZygoteChild):
                proc.detach()
        if self.zygote is not None:
            await self.zygote.close()

    def log_path(self, handle: str) -> Path:
        return self.log_dir / f"instance-{handle}.log"

    def _record_path(self, pid: int) -> Path:
        return self.records_dir / f"{pid}.json"

    def _record(self, pid: int, label: str, port: int) -> None:
        record = {"label": label, "port": port, "created": _create_time(pid)}
        path = self._record_path(pid)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(json.dumps(record))

    def _recorded(self, pid: int) -> dict[str, object] | None:
        """The record of a forked instance still alive under that pid (not a reused pid)."""
        try:
            record = json.loads(self._record_path(pid).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("created") != _create_time(pid):
            return None
        return record

    async def _launch(
        self, spec: InstanceSpec, port: int, env: dict[str, str], log_file: Path
    ) -> asyncio.subprocess.Process | ZygoteChild:
        command = self._command
        if command is None and spec.python is not None:
            # The zygote's interpreter has not the project's packages on its path.
            command = [spec.python, "-m", "instance_agent"]
        elif self.zygote is not None:
            argv = serve_command(spec.agent_args(port), [])
            try:
                return await self.zygote.spawn(argv, env, log_file)
            except ZygoteUnavailable as exc:
                logger.warning("agent zygote: %s; starting a fresh process", exc)
        try:
            with log_file.open("ab") as log:
                return await asyncio.create_subprocess_exec(
                    *serve_command(spec.agent_args(port), command),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise RuntimeFailed(f"could not start the instance process: {exc.strerror}") from exc

    async def start(self, spec: InstanceSpec) -> Launched:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_loopback_port()
        env = self._base_env()
        label = f"{self.cluster}:{spec.instance_id}:{spec.generation}"
        env[LABEL_ENV] = label
        env[LEASE_ENV] = f"{self.lease_grace_s:g}"
        log_file = self.log_dir / f"instance-{spec.instance_id}-{spec.generation}.log"
        proc = await self._launch(spec, port, env, log_file)
        self._procs[proc.pid] = proc
        if isinstance(proc, ZygoteChild):
            self._record(proc.pid, label, port)
        handle = str(proc.pid)
        # The log is named by pid too so `logs(handle)` finds it without a lookup table.
        with contextlib.suppress(OSError):
            self.log_path(handle).unlink(missing_ok=True)
            self.log_path(handle).symlink_to(log_file.name)
        return Launched(handle=handle, endpoint=f"http://127.0.0.1:{port}")

    def _child(self, pid: int) -> asyncio.subprocess.Process | ZygoteChild | None:
        """Our own child whose exit we will learn; None for adopted or orphaned instances."""
        proc = self._procs.get(pid)
        if isinstance(proc, ZygoteChild) and proc.orphaned:
            # The zygote died first: from here on only the OS can tell.
            self._procs.pop(pid, None)
            return None
        return proc

    def _labelled(self, pid: int) -> bool:
        """Whether a live process under `pid` is one of mlcp's instances (not a reused pid)."""
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return False
            if p.environ().get(LABEL_ENV):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return self._recorded(pid) is not None

    async def exited(self, handle: str) -> Exited | None:
        pid = int(handle)
        proc = self._child(pid)
        if proc is not None:
            if proc.returncode is None:
                return None
            self._procs.pop(pid, None)
            self._record_path(pid).unlink(missing_ok=True)
            return Exited(exit_reason(proc.returncode, last_lines(self.log_path(handle), 20)))
        # Not our child (adopted after a restart, or its zygote died): ask the OS.
        if self._labelled(pid):
            return None
        self._record_path(pid).unlink(missing_ok=True)
        for line in reversed(last_lines(self.log_path(handle), 20)):
            if (reason := load_failure(line)) is not None:
                return Exited("load failed: " + reason[:500])
        return Exited("instance process is gone")

    async def stop(self, handle: str, grace_s: float) -> None:
        pid = int(handle)
        proc = self._child(pid)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            self._procs.pop(pid, None)
            self._record_path(pid).unlink(missing_ok=True)
            return
        except PermissionError:
            return
        deadline = time.monotonic() + grace_s
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                pass
            proc = self._child(pid)
        else:
            await _wait_gone(pid, deadline - time.monotonic())
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if proc is None:
            # Not our child: "stopped" must mean gone, so wait for it to end.
            await _wait_gone(pid, 5)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
        self._procs.pop(pid, None)
        self._record_path(pid).unlink(missing_ok=True)

    def _list_forked(self) -> list[Listed]:
        """Forked instances, from their records (their /proc shows the zygote's environment)."""
        found: list[Listed] = []
        for path in sorted(self.records_dir.glob("*.json")):
            if not path.stem.isdigit():
                continue
            pid = int(path.stem)
            record = self._recorded(pid)
            if record is None or not _alive(pid):
                path.unlink(missing_ok=True)
                continue
            try:
                cluster, instance_id, generation = str(record["label"]).split(":")
                port = int(str(record["port"]))
            except (KeyError, ValueError):
                continue
            if cluster == self.cluster:
                endpoint = f"http://127.0.0.1:{port}"
                found.append(Listed(int(instance_id), int(generation), str(pid), endpoint))
        return found

    def _list_spawned(self) -> list[Listed]:
        found: list[Listed] = []
        for pid, label, cmd in labelled_processes():
            try:
                cluster, instance_id, generation = label.split(":")
                # Only process-group leaders: an agent's own children inherit its environment.
                if cluster != self.cluster or os.getpgid(pid) != pid:
                    continue
                port = cmd[cmd.index("--port") + 1] if "--port" in cmd else None
                endpoint = f"http://127.0.0.1:{port}" if port else None
                found.append(Listed(int(instance_id), int(generation), str(pid), endpoint))
            except (ProcessLookupError, ValueError, IndexError):
                continue
        return found

    async def list(self) -> list[Listed]:
        # In a thread: it reads every process's environment (the reconciler, every 10 s).
        found = await asyncio.to_thread(self._list_spawned)
        return found + self._list_forked()

    async def logs(self, handle: str, tail_lines: int) -> str:
        return "\n".join(last_lines(self.log_path(handle), tail_lines))
