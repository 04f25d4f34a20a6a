"""The asyncpg pool every IO module shares."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

# A query that takes longer than this is a bug or an overloaded server; fail it rather than hang.
COMMAND_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

Pool = asyncpg.Pool


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> Pool:
    """Open a pool whose connections speak UTC and decode jsonb."""
    pool: Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=COMMAND_TIMEOUT_S,
        timeout=CONNECT_TIMEOUT_S,
        server_settings={"timezone": "UTC", "application_name": "mlcp"},
        init=_init_connection,
    )
    return pool


async def connect(dsn: str) -> asyncpg.Connection:
    """Open a single connection (migrations, CLI commands)."""
    conn: Any = await asyncpg.connect(
        dsn, timeout=CONNECT_TIMEOUT_S, server_settings={"timezone": "UTC"}
    )
    await _init_connection(conn)
    return conn  # type: ignore[no-any-return]
