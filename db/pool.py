"""The asyncpg pool every IO module shares."""

from __future__ import annotations

import json
from typing import Any, TypeAlias

import asyncpg

from db import DatabaseUnavailable

# A query that takes longer than this is a bug or an overloaded server; fail it rather than hang.
COMMAND_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

Pool: TypeAlias = asyncpg.Pool

# Raised while opening a connection when the server is down, restarting, full or refusing, or
# the database is gone: an outage to wait out, never a bug of ours.
_CONNECT_FAILURES: tuple[type[Exception], ...] = (
    OSError,  # refused, socket missing, reset, connect timeout
    asyncpg.PostgresConnectionError,  # 08xxx
    asyncpg.OperatorInterventionError,  # 57xxx: shutting down, starting up
    asyncpg.InsufficientResourcesError,  # 53xxx: too many connections
    asyncpg.InvalidCatalogNameError,  # 3D000: the database was dropped
    asyncpg.ObjectNotInPrerequisiteStateError,  # 55000: not accepting connections
)
# Raised on an open connection when the server goes away under a query.
LOST_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    # A pooled connection the server shut down under a pending statement ("cannot switch to
    # state 11; another operation is in progress"), seen on every PostgreSQL fast shutdown here.
    asyncpg.exceptions.InternalClientError,
)


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection that notes when it holds session state (a LISTEN)."""

    session_state = False

    async def add_listener(self, channel: str, callback: Any) -> None:
        self.session_state = True
        await super().add_listener(channel, callback)


async def _reset(conn: asyncpg.Connection) -> None:
    """On release, after asyncpg's own rollback of an open transaction: the server-side reset
    (advisory locks, cursors, LISTEN, settings) only where a connection may hold such state.

    mlcp's pooled queries make none but a LISTEN: advisory locks are transaction-scoped, settings
    SET LOCAL, cursors live in transactions. The reset was a second round trip after every
    query (`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`).
    """
    if getattr(conn, "session_state", False):
        await conn.execute(conn.get_reset_query())
        conn.session_state = False


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _connect_or_unavailable(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg.connect for the pool, with outages translated to DatabaseUnavailable."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
    except _CONNECT_FAILURES as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {type(exc).__name__}") from exc
    return conn


async def create_pool(dsn: str, *, min_size: int = 0, max_size: int = 10) -> Pool:
    """Open a pool whose connections speak UTC and decode jsonb.

    No connection floor by default: asyncpg restores a floor in a loop of its own that logs a
    traceback per retry while the database is down; connections open on demand instead.
    """
    pool: Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=COMMAND_TIMEOUT_S,
        timeout=CONNECT_TIMEOUT_S,
        server_settings={"timezone": "UTC", "application_name": "mlcp"},
        init=_init_connection,
        connect=_connect_or_unavailable,
        connection_class=_Connection,
        reset=_reset,
    )
    return pool


async def connect(dsn: str) -> asyncpg.Connection:
    """Open a single connection (migrations, CLI commands)."""
    conn = await _connect_or_unavailable(
        dsn, timeout=CONNECT_TIMEOUT_S, server_settings={"timezone": "UTC"}
    )
    await _init_connection(conn)
    return conn
