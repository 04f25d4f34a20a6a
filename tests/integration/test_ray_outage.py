"""The Ray cluster going away under a serving control plane: running instances keep serving,
loads answer 503 cluster_unavailable with Retry-After, the control plane stays up.

Its own one-node cluster (a helper process), so the session's cluster is not harmed; the
control plane runs as a subprocess, the cluster's GCS is SIGKILLed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.server import Server, http, start, stop
from tests.fake_agent import write_fake_model
from tests.harness import ADMIN_KEY
from tests.integration.test_instances import FAKE_AGENT
from tests.ray_cluster import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HELPER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args=dict(
    node_ip_address="127.0.0.1", num_cpus=1, memory=2 << 30,
    object_store_memory=80 << 20, include_dashboard=False))
gcs = cluster.head_node.all_processes["gcs_server"][0].process.pid
print(cluster.address, gcs, flush=True)
sys.stdin.read()
cluster.shutdown()
"""


def start_cluster() -> subprocess.Popen[str]:
    """The helper that holds a one-node cluster until its stdin closes."""
    return subprocess.Popen(
        [sys.executable, "-c", HELPER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )


@pytest.mark.timeout(240)
def start_on_ray(tmp_path: Path, address: str, db_dsn: str, **env: str) -> Server:
    """A control plane subprocess on the Ray cluster at `address`, serving the fake models
    under tmp_path/models with the fake agent (this process drives other clusters)."""
    return start(
        tmp_path / "cp",
        tmp_path,
        "cp",
        MLCP_RUNTIME="ray",
        MLCP_RAY_ADDRESS=address,
        MLCP_DATABASE_URL=db_dsn,
        MLCP_ADMIN_KEY=ADMIN_KEY,
        MLCP_GRPC_PORT="0",
        MLCP_INCLUDE_PACKAGED_MODELS="false",
        MLCP_USE_GPUS="false",
        MLCP_MODEL_DIRS=str(tmp_path / "models"),
        MLCP_AGENT_COMMAND=json.dumps(FAKE_AGENT),
        MLCP_START_TIMEOUT_S="30",
        **env,
    )


async def mark_all_measured(db_dsn: str) -> None:
    db = await asyncpg.connect(db_dsn)
    try:
        await db.execute("UPDATE models SET required_ram_bytes = 50000000, benchmarked_at = now()")
    finally:
        await db.close()


async def test_a_cluster_that_goes_away_answers_503_and_instances_keep_serving(
    db_dsn: str, tmp_path: Path
) -> None:
    helper = start_cluster()
    try:
        assert helper.stdout is not None
        address, gcs = (await asyncio.to_thread(helper.stdout.readline)).split()
        for name in ("fake/ok", "fake/other"):
            write_fake_model(tmp_path / "models", name, mode="ok")
        server = start_on_ray(tmp_path, address, db_dsn)
        try:
            await mark_all_measured(db_dsn)

            def call(path: str, body: object) -> tuple[int, object]:
                status, out = http("POST", server.base + path, ADMIN_KEY, body)
                return status, out

            status, out = await asyncio.to_thread(call, "/model/load", {"model": "fake/ok"})
            assert status == 200, out
            deadline = time.monotonic() + 60
            while True:
                status, out = await asyncio.to_thread(call, "/model/status", {"model": "fake/ok"})
                if isinstance(out, dict) and out.get("status") == "RUNNING":
                    break
                assert time.monotonic() < deadline, out
                await asyncio.sleep(0.2)

            os.kill(int(gcs), signal.SIGKILL)
            run = {"model": "fake/ok", "prompt": "still"}
            status, out = await asyncio.to_thread(call, "/model/run", run)
            assert status == 200 and out["output"] == "echo: still", out  # type: ignore[index]

            deadline = time.monotonic() + 60
            while True:
                status, out = await asyncio.to_thread(call, "/model/load", {"model": "fake/other"})
                if status == 503:
                    break
                assert status == 200 and time.monotonic() < deadline, out
                await asyncio.to_thread(call, "/model/delete", {"model": "fake/other"})
                await asyncio.sleep(1)
            assert out["code"] == "cluster_unavailable", out  # type: ignore[index]
            assert http("GET", server.base + "/health", ADMIN_KEY)[0] == 200
            assert server.proc.poll() is None, "the control plane died with the cluster"
        finally:
            stop(server)
    finally:
        if helper.stdin is not None:
            helper.stdin.close()
        try:
            await asyncio.to_thread(helper.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(helper.pid, signal.SIGKILL)
            await asyncio.to_thread(helper.wait, 10)
        # Ray's per-node agents of the killed GCS wait a minute for it: not past the test.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(helper.pid, signal.SIGKILL)
        if helper.stdout is not None:
            helper.stdout.close()
