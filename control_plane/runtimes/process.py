"""The `process` runtime: each instance agent is a subprocess in its own process group.

The instance is labelled through its environment (MLCP_INSTANCE=<id>:<generation>) so a control
plane that restarts can find its processes again; its output goes to a log file per instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

import psutil

from control_plane.errors import RuntimeFailed
from control_plane.runtimes.base import Exited, InstanceSpec, Launched, Listed
from instance_agent.lease import DEFAULT_LEASE_GRACE_S, LEASE_ENV

# <cluster>:<instance id>:<generation>
LABEL_ENV = "MLCP_INSTANCE"
LOAD_FAILED_MARK = "mlcp-agent: load failed:"


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def agent_command(spec: InstanceSpec, port: int, base: list[str] | None = None) -> list[str]:
    cmd = [
        *(base or [sys.executable, "-m", "instance_agent"]),
        "serve",
        "--model-dir",
        str(spec.model_dir),
        "--model-name",
        spec.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--concurrency",
        str(spec.concurrency),
        "--max-queue",
        str(spec.max_queue),
        "--device",
        spec.device,
    ]
    if spec.gguf_file:
        cmd += ["--gguf-file", spec.gguf_file]
    return cmd


def _alive(pid: int) -> bool:
    try:
        status = str(psutil.Process(pid).status())
    except psutil.NoSuchProcess:
        return False
    return bool(status != psutil.STATUS_ZOMBIE)


def last_lines(path: Path, n: int) -> list[str]:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            return list(deque((line.rstrip("\n") for line in fh), maxlen=n))
    except OSError:
        return []


def exit_reason(returncode: int, log_tail: list[str]) -> str:
    """A human reason for an agent's exit, preferring its own load-failure line."""
    for line in reversed(log_tail):
        if LOAD_FAILED_MARK in line:
            return "load failed: " + line.split(LOAD_FAILED_MARK, 1)[1].strip()[:500]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"instance process was killed by {name}"
    return f"instance process exited with code {returncode}"


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
    ) -> None:
        self.lease_grace_s = lease_grace_s
        self.log_dir = log_dir
        self.cluster = cluster
        self._command = command
        self._env = env or {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}

    def log_path(self, handle: str) -> Path:
        return self.log_dir / f"instance-{handle}.log"

    async def start(self, spec: InstanceSpec) -> Launched:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_loopback_port()
        env = dict(os.environ)
        env.update(self._env)
        env[LABEL_ENV] = f"{self.cluster}:{spec.instance_id}:{spec.generation}"
        env[LEASE_ENV] = f"{self.lease_grace_s:g}"
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        log_file = self.log_dir / f"instance-{spec.instance_id}-{spec.generation}.log"
        try:
            with log_file.open("ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    *agent_command(spec, port, self._command),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        except OSError as exc:
            raise RuntimeFailed(f"could not start the instance process: {exc.strerror}") from exc
        self._procs[proc.pid] = proc
        handle = str(proc.pid)
        # The log is named by pid too so `logs(handle)` finds it without a lookup table.
        with contextlib.suppress(OSError):
            self.log_path(handle).unlink(missing_ok=True)
            self.log_path(handle).symlink_to(log_file.name)
        return Launched(handle=handle, endpoint=f"http://127.0.0.1:{port}")

    async def exited(self, handle: str) -> Exited | None:
        pid = int(handle)
        proc = self._procs.get(pid)
        if proc is not None:
            if proc.returncode is None:
                return None
            self._procs.pop(pid, None)
            return Exited(exit_reason(proc.returncode, last_lines(self.log_path(handle), 20)))
        # Not our child (adopted after a restart): ask the OS.
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(LABEL_ENV):
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        return Exited("instance process is gone")

    async def stop(self, handle: str, grace_s: float) -> None:
        pid = int(handle)
        proc = self._procs.get(pid)
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            self._procs.pop(pid, None)
            return
        except PermissionError:
            return
        deadline = time.monotonic() + grace_s
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                pass
        else:
            # Not our child: nothing to await, so poll the OS until it is gone.
            while time.monotonic() < deadline and psutil.pid_exists(pid):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if proc is None:
            # Not our child: "stopped" must mean gone, so wait for the OS to reap it.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _alive(pid):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        if proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            self._procs.pop(pid, None)

    async def list(self) -> list[Listed]:
        found: list[Listed] = []
        for p in psutil.process_iter(["pid", "environ", "cmdline"]):
            try:
                label = (p.info.get("environ") or {}).get(LABEL_ENV)
                if not label or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                cluster, instance_id, generation = label.split(":")
                # Only process-group leaders: an agent's own children inherit its environment.
                if cluster != self.cluster or os.getpgid(p.pid) != p.pid:
                    continue
                cmd = p.info.get("cmdline") or []
                port = cmd[cmd.index("--port") + 1] if "--port" in cmd else None
                endpoint = f"http://127.0.0.1:{port}" if port else None
                found.append(Listed(int(instance_id), int(generation), str(p.pid), endpoint))
            except (
                psutil.NoSuchProcess,
                psutil.AccessDenied,
                ProcessLookupError,
                ValueError,
                IndexError,
            ):
                continue
        return found

    async def logs(self, handle: str, tail_lines: int) -> str:
        return "\n".join(last_lines(self.log_path(handle), tail_lines))
