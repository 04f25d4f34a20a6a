"""A control plane run as a subprocess the way `make run` starts it, for end-to-end tests.

Follows vLLM's RemoteOpenAIServer: a free port, poll /health, tell "exited" from "too slow",
terminate → wait → kill, by PID only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import free_port

START_DEADLINE_S = 90.0
STOP_DEADLINE_S = 30.0


def server_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCP_")}
    env.update(
        MLCP_PORT=str(port),
        MLCP_DATA_DIR=str(data_dir),
        # An empty Hugging Face cache: the catalog holds only the demo model.
        HF_HUB_CACHE=str(data_dir.parent / "hf-cache"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str
    stdout: Path
    stderr: Path

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")


def http(
    method: str, url: str, key: str | None = None, body: Any = None, timeout: float = 10
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if key:
        req.add_header("Authorization", f"Key {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def start(data_dir: Path, logs: Path, tag: str, **extra_env: str) -> Server:
    port = free_port()
    stdout, stderr = logs / f"{tag}.out", logs / f"{tag}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane", "serve"],
            env=server_env(data_dir, port, **extra_env),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", stdout, stderr)
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        code = proc.poll()
        if code is not None:
            pytest.fail(f"server exited with {code} during start-up:\n{server.err()[-4000:]}")
        try:
            if http("GET", server.base + "/health", timeout=1)[0] == 200:
                return server
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            stop(server)
            pytest.fail(
                f"server still not healthy after {START_DEADLINE_S} s:\n{server.err()[-4000:]}"
            )
        time.sleep(0.1)


def stop(server: Server) -> int:
    """SIGTERM, wait for a graceful exit, SIGKILL after the deadline; returns the exit code."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            return server.proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
            pytest.fail(f"server ignored SIGTERM for {STOP_DEADLINE_S} s:\n{server.err()[-4000:]}")
    return server.proc.returncode


def postmaster_pid(pgdata: Path) -> int | None:
    """The PID of the PostgreSQL serving `pgdata` if it still runs, else None."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        return pid if alive and proc.name().startswith("postgres") else None
    except psutil.Error:
        return None


def stop_postgres(pgdata: Path) -> None:
    """Stop a PostgreSQL left behind under `pgdata` with pgserver's own pg_ctl."""
    if postmaster_pid(pgdata) is None:
        return
    from pgserver._commands import pg_ctl

    user = "pgserver" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=30)


def wait_postgres_gone(pgdata: Path, deadline_s: float = 15.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if postmaster_pid(pgdata) is None:
            return True
        time.sleep(0.1)
    return False


def assert_graceful(code: int, server: Server) -> None:
    # uvicorn re-raises SIGTERM once it has shut down gracefully, so -SIGTERM is a clean exit.
    assert code in (0, -signal.SIGTERM), server.err()[-4000:]
    assert "Application shutdown complete" in server.err(), server.err()[-4000:]
