"""The Ray head going away and a new one starting on the same address, under a serving control
plane: the control plane joins the new cluster by itself, instances whose actors went with the
old cluster become FAILED with the reason and release their memory, and loads work again, all
without restarting the control plane.

The head is a `ray start --head --block` of its own (its own port and temp dir, in its own
process group, so killing the group stops it, and nothing else); the control plane runs as a
subprocess (this process is a driver of the session's module clusters elsewhere)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import http, stop
from tests.fake_agent import write_fake_model
from tests.harness import ADMIN_KEY, free_port
from tests.integration.test_ray_outage import mark_all_measured, start_on_ray
from tests.ray_cluster import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def head(port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A one-node Ray head on 127.0.0.1:`port`, up until the block ends (or killed before).

    Its temp dir is short (Ray's socket paths under it must fit in 107 bytes) and removed after.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="mlcp-ray-"))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(RAY, "start", "--head", "--block", "--port", str(port)),
                *("--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--memory", str(2 << 30)),
                *("--object-store-memory", str(80 << 20), "--include-dashboard", "false"),
                *("--disable-usage-stats", "--temp-dir", str(temp_dir)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        yield proc
    finally:
        kill_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def kill_head(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the head's whole process group (GCS, raylet, workers, the actors' agents)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


async def until(what: str, check: Callable[[], Any], timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = await asyncio.to_thread(check)
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        await asyncio.sleep(0.5)


@pytest.mark.timeout(300)
async def test_a_new_head_on_the_same_address_is_joined_and_lost_instances_fail(
    db_dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    for name in ("fake/ok", "fake/other"):
        write_fake_model(tmp_path / "models", name, mode="ok")
    with head(port, tmp_path / "ray-a.log") as first:
        server = start_on_ray(tmp_path, f"127.0.0.1:{port}", db_dsn, MLCP_RAY_NODES_REFRESH_S="0.5")
        try:
            await mark_all_measured(db_dsn)

            def call(path: str, body: object | None = None) -> tuple[int, Any]:
                method = "GET" if body is None else "POST"
                return http(method, server.base + path, ADMIN_KEY, body)  # type: ignore[no-any-return]

            def status_is(model: str, state: str) -> dict[str, Any] | None:
                _, out = call("/model/status", {"model": model})
                return out if isinstance(out, dict) and out.get("status") == state else None

            status, out = await asyncio.to_thread(call, "/model/load", {"model": "fake/ok"})
            assert status == 200, out
            running = await until("fake/ok RUNNING", lambda: status_is("fake/ok", "RUNNING"))
            pid = server.proc.pid

            kill_head(first)
            # The control plane notices the cluster gone (its next node-table read).
            await until("loads 503", lambda: call("/capacity")[0] == 503, 30)
            status, out = await asyncio.to_thread(call, "/model/load", {"model": "fake/other"})
            assert status == 503 and out["code"] == "cluster_unavailable", out

            with head(port, tmp_path / "ray-b.log"):
                failed = await until("fake/ok FAILED", lambda: status_is("fake/ok", "FAILED"))
                assert "the Ray cluster restarted" in failed["reason"], failed
                status, capacity = await asyncio.to_thread(call, "/capacity")
                assert status == 200, capacity
                [device] = capacity["devices"]
                assert device["node"] != running["node"] and device["reservedBytes"] == 0

                status, out = await asyncio.to_thread(call, "/model/load", {"model": "fake/other"})
                assert status == 200, out
                other = await until(
                    "fake/other RUNNING", lambda: status_is("fake/other", "RUNNING")
                )
                assert other["node"] == device["node"]
                run = {"model": "fake/other", "prompt": "again"}
                status, out = await asyncio.to_thread(call, "/model/run", run)
                assert status == 200 and out["output"] == "echo: again", out
                assert server.proc.poll() is None and server.proc.pid == pid
                status, _ = await asyncio.to_thread(call, "/model/delete", {"model": "fake/other"})
                assert status == 200
        finally:
            stop(server)
