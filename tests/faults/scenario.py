"""What the fault scenarios share: fake models, a control plane over a given database."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from db.migrate import migrate
from tests.fake_agent import write_fake_model
from tests.harness import Api, make_settings, mark_measured, serve

FAKE_AGENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "fake_agent.py")]


async def migrated(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def control_plane(
    dsn: str, root: Path, models: dict[str, dict[str, Any]], **overrides: Any
) -> AsyncIterator[Api]:
    """A control plane served in this process on `dsn`, with fake models measured."""
    folder = root / "models"
    for name, behaviour in models.items():
        write_fake_model(folder, name, **behaviour)
    values: dict[str, Any] = {
        "model_dirs": str(folder),
        "agent_command": FAKE_AGENT,
        "start_timeout_s": 6.0,
        "include_packaged_models": False,
    }
    values.update(overrides)
    settings = make_settings(dsn, root / "data", **values)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        api = Api(base, session, settings)
        for name in models:
            await mark_measured(api, name, 50_000_000)
        yield api
