"""The real instance agent as a subprocess on a free loopback port, for tests.

Started with `python -m instance_agent serve`, polled on /health (telling "exited" from "too
slow"), stopped by its own PID: terminate, wait, kill (after vLLM's RemoteOpenAIServer).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class AgentExited(RuntimeError):
    """The agent process ended before it became ready."""


class AgentTooSlow(RuntimeError):
    """The agent process is alive but did not become ready in time."""


class AgentProcess:
    """`python -m instance_agent serve ...` on a free port (after vLLM's RemoteOpenAIServer)."""

    def __init__(self, model_dir: Path, *args: str, model_name: str | None = "tiny") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "instance_agent",
            "serve",
            "--model-dir",
            str(model_dir),
            *(["--model-name", model_name] if model_name else []),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *args,
        ]
        # A file, not a pipe: nobody drains a pipe while the test runs, and a full one blocks.
        self._log = tempfile.NamedTemporaryFile(prefix="mlcp-agent-", suffix=".log")
        self.proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.health_seen: list[tuple[int, dict[str, Any]]] = []

    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_ready(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Poll /health until ready, telling "exited" from "too slow"."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise AgentExited(f"agent exited with code {code}:\n{self.output()[-3000:]}")
            try:
                status, body = self.health()
            except (urllib.error.URLError, OSError):
                pass
            else:
                self.health_seen.append((status, body))
                if status == 200:
                    return body
            if time.monotonic() > deadline:
                raise AgentTooSlow(f"agent not ready after {timeout_s} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Terminate, wait, then kill, by this process's PID only."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
