"""Helpers the tests share that are not fixtures: settings, a served app, an HTTP client.

Kept out of conftest.py so `from tests.harness import …` never loads conftest a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvicorn

from control_plane.app import create_app
from control_plane.settings import Settings

ADMIN_KEY = "mlcp_test-admin-key-0123456789abcdefghijklmnop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _replace_db(dsn: str, name: str) -> str:
    """The same server URL pointing at database `name` (works for socket and TCP URLs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


def make_settings(db_dsn: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_dsn,
        "data_dir": data_dir,
        "admin_key": ADMIN_KEY,
        "port": 0,
        "hf_cache_dir": data_dir / "hf-cache",
        "include_packaged_models": True,
        # Tests must not leave instances behind; restart tests turn this off.
        "stop_instances_on_exit": True,
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
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
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
