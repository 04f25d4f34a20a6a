"""Start a real control plane (a subprocess, as `make run` does) for a benchmark, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.request import Request, urlopen

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "mlcp_bench-admin-key-0123456789abcdefghijkl"
FAKE_AGENT = [sys.executable, str(ROOT / "tests" / "fake_agent.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ControlPlane:
    base: str
    data_dir: Path
    key: str = ADMIN_KEY

    def call(self, path: str, body: object | None = None, timeout: float = 30) -> object:
        data = json.dumps(body).encode() if body is not None else None
        req = Request(
            self.base + path,
            data=data,
            method="POST" if data is not None else "GET",
            headers={"Authorization": f"Key {self.key}", "Content-Type": "application/json"},
        )
        with urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def mark_measured(self, models: list[str], mem_bytes: int) -> None:
        """Give models a benchmark figure in the embedded database, as a finished job would.

        /model/load refuses unmeasured models; the benchmarks about other things skip measuring.
        """

        async def write() -> None:
            dsn = f"postgresql://postgres:@/postgres?host={self.data_dir.resolve() / 'pg'}"
            conn = await asyncpg.connect(dsn)
            try:
                done = await conn.execute(
                    "UPDATE models SET required_ram_bytes = $2, benchmarked_at = now()"
                    " WHERE name = ANY($1::text[])",
                    models,
                    mem_bytes,
                )
            finally:
                await conn.close()
            if done != f"UPDATE {len(models)}":
                raise RuntimeError(f"not all of {len(models)} models are in the catalog: {done}")

        asyncio.run(write())

    def wait_running(self, model: str, timeout_s: float = 120) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.call("/model/status", {"model": model})
            assert isinstance(status, dict)
            if status["status"] == "RUNNING":
                return status
            if status["status"] == "FAILED":
                raise RuntimeError(f"{model} failed: {status['reason']}")
            time.sleep(0.05)
        raise RuntimeError(f"{model} did not start within {timeout_s} s")


@contextlib.contextmanager
def control_plane(
    model_dirs: list[Path] | None = None, *, fake_agent: list[str] | None = None, **env: str
) -> Iterator[ControlPlane]:
    """A control plane with an embedded database in a temporary data dir."""
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        port = free_port()
        environ = dict(os.environ)
        environ.pop("MLCP_DATABASE_URL", None)
        environ.update(
            MLCP_PORT=str(port),
            MLCP_DATA_DIR=str(data_dir),
            MLCP_ADMIN_KEY=ADMIN_KEY,
            MLCP_MODEL_DIRS=":".join(str(d) for d in model_dirs or []),
            # Instances outlive a control plane by design (the next one adopts them, or their
            # lease ends them after 5 min): a benchmark's would run on beside the next benchmark.
            MLCP_STOP_INSTANCES_ON_EXIT="true",
            **env,
        )
        if fake_agent is not None:
            environ["MLCP_AGENT_COMMAND"] = json.dumps(fake_agent)
        log = (Path(tmp) / "cp.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane", "serve"],
            cwd=ROOT,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"control plane exited: {(Path(tmp) / 'cp.log').read_text()[-2000:]}"
                    )
                with contextlib.suppress(OSError):
                    with urlopen(base + "/health", timeout=1):
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("control plane did not start within 60 s")
                time.sleep(0.1)
            yield ControlPlane(base, data_dir)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
