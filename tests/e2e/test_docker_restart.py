"""A control plane killed with SIGKILL while its containers run: restarted, it adopts them and they
still answer. The control plane runs as `python -m control_plane serve`, configured only through
the environment, as a user would run it; the instance is the fake agent in a container."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import docker.errors
import pytest
from docker import DockerClient

# The session fixtures `engine` and `agent_image` are imported to be registered here.
from tests.docker_engine import FAKE_IN_CONTAINER, fake_model
from tests.harness import ADMIN_KEY, free_port

pytestmark = pytest.mark.docker

HEADERS = {"Authorization": f"Key {ADMIN_KEY}"}


@contextmanager
def control_plane(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


async def call(session: aiohttp.ClientSession, base: str, path: str, body: Any) -> Any:
    async with session.post(base + path, json=body, headers=HEADERS) as resp:
        return resp.status, await resp.json(content_type=None)


async def wait_running(
    session: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes], model: str
) -> dict[str, Any]:
    body: Any = None
    for _ in range(400):
        assert proc.poll() is None, "the control plane exited"
        try:
            status, body = await call(session, base, "/model/status", {"model": model})
            if status == 200 and body["status"] == "RUNNING":
                return body  # type: ignore[no-any-return]
        except aiohttp.ClientError:
            pass  # still starting
        await asyncio.sleep(0.1)
    raise AssertionError(f"{model} never became RUNNING: {body}")


async def test_sigkilled_control_plane_adopts_its_containers(
    engine: DockerClient,
    agent_image: str,
    db_dsn: str,
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    fake_model(models, "fake/ok")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLCP_DATABASE_URL": db_dsn,
        "MLCP_DATA_DIR": str(tmp_path / "data"),
        "MLCP_ADMIN_KEY": ADMIN_KEY,
        "MLCP_PORT": str(port),
        "MLCP_MODEL_DIRS": str(models),
        "MLCP_INCLUDE_PACKAGED_MODELS": "false",
        "MLCP_RUNTIME": "docker",
        "MLCP_DOCKER_IMAGE": agent_image,
        "MLCP_DOCKER_NETWORK": "host",
        "MLCP_AGENT_COMMAND": json.dumps(FAKE_IN_CONTAINER),
    }
    log = tmp_path / "control-plane.log"
    async with aiohttp.ClientSession() as session:
        with control_plane(env, log) as proc:
            for _ in range(300):  # until it has started and catalogued the model
                try:
                    status, _ = await call(session, base, "/model/list", None)
                    break
                except aiohttp.ClientError:
                    assert proc.poll() is None, log.read_text()
                    await asyncio.sleep(0.1)
            # Admission wants a benchmark figure, as a finished /model/job would leave.
            conn = await asyncpg.connect(db_dsn)
            try:
                await conn.execute(
                    "UPDATE models SET required_ram_bytes = 50000000, benchmarked_at = now()"
                    " WHERE name = 'fake/ok'"
                )
            finally:
                await conn.close()
            status, body = await call(session, base, "/model/load", {"model": "fake/ok"})
            assert status == 200, body
            before = await wait_running(session, base, proc, "fake/ok")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        conn = await asyncpg.connect(db_dsn)
        try:
            handle = await conn.fetchval("SELECT handle FROM instances WHERE model = 'fake/ok'")
        finally:
            await conn.close()
        container = engine.containers.get(handle)
        try:
            assert container.status == "running"
            with control_plane(env, log) as proc:
                after = await wait_running(session, base, proc, "fake/ok")
                assert after["created"] == before["created"]
                assert after["expiresAt"] == before["expiresAt"]
                status, out = await call(
                    session, base, "/model/run", {"model": "fake/ok", "prompt": "hi"}
                )
                assert status == 200 and out["output"] == "echo: hi", out
                status, out = await call(session, base, "/model/delete", {"model": "fake/ok"})
                assert status == 200 and out["status"] == "STOPPED"
            with pytest.raises(docker.errors.NotFound):
                container.reload()
        finally:
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
