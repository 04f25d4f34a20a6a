"""Helpers the tests share that are not fixtures: settings, a served app, an HTTP client.

Kept out of conftest.py so `from tests.harness import …` never loads conftest a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import uvicorn

from control_plane.app import create_app
from control_plane.fast_lane import server_config
from control_plane.settings import Settings
from control_plane.state import AppState
from instance_agent.launch import free_loopback_port as free_port

ADMIN_KEY = "mlcp_test-admin-key-0123456789abcdefghijklmnop"


def _replace_db(dsn: str, name: str) -> str:
    """The same server URL pointing at database `name` (works for socket and TCP URLs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


async def create_database(
    server_dsn: str, prefix: str, template: str | None = None
) -> tuple[str, str]:
    """Create a database (empty, or cloned from `template`) on the test server: (name, URL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        clone = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{clone}')
    finally:
        await admin.close()
    return name, _replace_db(server_dsn, name)


def make_settings(db_dsn: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_dsn,
        "data_dir": data_dir,
        "admin_key": ADMIN_KEY,
        "port": 0,
        "grpc_port": 0,
        "hf_cache_dir": data_dir / "hf-cache",
        "include_packaged_models": True,
        # Tests must not leave instances behind; restart tests turn this off.
        "stop_instances_on_exit": True,
        # A spare container imports torch (seconds of CPU): only the tests of spares make one.
        "docker_spares": 0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Api:
    """A control plane served by uvicorn on loopback, and a client session for it."""

    base: str
    session: aiohttp.ClientSession
    settings: Settings

    def headers(self, key: str | None = ADMIN_KEY) -> dict[str, str]:
        return {"Authorization": f"Key {key}"} if key else {}

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = ADMIN_KEY,
        headers: dict[str, str] | None = None,
        data: bytes | str | None = None,
    ) -> tuple[int, Any]:
        hdrs = self.headers(key)
        hdrs.update(headers or {})
        kwargs: dict[str, Any] = {"headers": hdrs}
        if data is not None:
            kwargs["data"] = data
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            text = await resp.text()
            try:
                import json

                payload: Any = json.loads(text)
            except ValueError:
                payload = text
            return resp.status, payload


# base URL → the app served there, so tests can reach its state (app.state.mlcp).
SERVED_APPS: dict[str, Any] = {}


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[str]:
    """Run create_app(settings) on a real uvicorn server; yield its base URL."""
    port = free_port()
    app = create_app(settings)
    # The protocol `mlcp serve` runs with (its limits and the fast lane), so tests see them too.
    config = server_config(
        app, settings.http_limits, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started:
            break
        if task.done():
            task.result()
            raise RuntimeError("server exited during start-up")
        await asyncio.sleep(0.025)
    else:
        raise RuntimeError("server did not start within 10 s")
    base = f"http://127.0.0.1:{port}"
    SERVED_APPS[base] = app
    try:
        yield base
    finally:
        SERVED_APPS.pop(base, None)
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def own_control_plane(
    server_dsn: str, template: str, data_dir: Path, **overrides: Any
) -> AsyncIterator[Api]:
    """A control plane served here on a database of its own (cloned from `template`, with a
    cluster id of its own), dropped afterwards: for a module whose tests share one server."""
    name, dsn = await create_database(server_dsn, "mlcp_t", template)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE cluster SET id = $1", uuid.uuid4().hex[:12])
    finally:
        await conn.close()
    settings = make_settings(dsn, data_dir, **overrides)
    try:
        async with serve(settings) as base, aiohttp.ClientSession() as session:
            yield Api(base, session, settings)
    finally:
        admin = await asyncpg.connect(server_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def app_state(api: Api) -> AppState:
    """The AppState of the control plane `api` talks to (served in this process)."""
    return SERVED_APPS[api.base].state.mlcp  # type: ignore[no-any-return]


async def mark_measured(api: Api, model: str, mem_bytes: int) -> None:
    """Give a fake model a benchmark figure, as a finished /model/job would."""
    await app_state(api).pool.execute(
        "UPDATE models SET required_ram_bytes = $2, benchmarked_at = now() WHERE name = $1",
        model,
        mem_bytes,
    )


async def wait_status(api: Api, model: str, want: str, timeout_s: float = 15) -> dict[str, Any]:
    """Poll /model/status until the model's latest instance is in state `want`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    body: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        status, body = await api.call("POST", "/model/status", {"model": model})
        if status == 200 and body["status"] == want:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model} never reached {want}: last {body}")


async def load(api: Api, model: str, **extra: Any) -> dict[str, Any]:
    """POST /model/load and expect 200."""
    status, body = await api.call("POST", "/model/load", {"model": model, **extra})
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def instance_pid(api: Api, model: str) -> int:
    """The process id of the model's latest instance (process runtime)."""
    row = await app_state(api).pool.fetchrow(
        "SELECT handle FROM instances WHERE model = $1 ORDER BY id DESC LIMIT 1", model
    )
    return int(row["handle"])


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def wait_gone(pid: int, timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if not pid_alive(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} is still running")
