"""Shared fixtures: a real PostgreSQL, a migrated template database cloned per test, and the
control plane served by a real uvicorn on a loopback port."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from control_plane.settings import Settings
from db.migrate import migrate
from tests.docker_engine import agent_image, engine  # noqa: F401  (shared session fixtures)
from tests.harness import Api, create_database, make_settings, serve
from tests.ray_cluster import ray_cluster, ray_nodes  # noqa: F401  (shared fixtures)


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL: MLCP_TEST_DATABASE_URL if given, else an embedded server."""
    url = os.environ.get("MLCP_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
async def template_db(pg_dsn: str) -> str:
    name, dsn = await create_database(pg_dsn, "mlcp_tpl")
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return name


@pytest.fixture
async def db_dsn(pg_dsn: str, template_db: str) -> AsyncIterator[str]:
    """A fresh database cloned from the migrated template, dropped after the test."""
    name, dsn = await create_database(pg_dsn, "mlcp_t", template_db)
    # Each clone is its own deployment, so its instances never mix with another test's.
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE cluster SET id = $1", uuid.uuid4().hex[:12])
    finally:
        await conn.close()
    yield dsn
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    from db.pool import create_pool

    pool = await create_pool(db_dsn, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
def settings(db_dsn: str, tmp_path: Path) -> Settings:
    return make_settings(db_dsn, tmp_path / "data")


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        yield Api(base, session, settings)
