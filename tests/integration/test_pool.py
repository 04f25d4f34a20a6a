"""The shared asyncpg pool against a real PostgreSQL: what a released connection keeps."""

from __future__ import annotations

import warnings

import asyncpg
import pytest

from db.pool import create_pool


async def test_a_released_connection_keeps_no_session_state(db_dsn: str) -> None:
    pool = await create_pool(db_dsn, max_size=1)  # one connection: each acquire gets it again
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # asyncpg warns of the listener left behind
            async with pool.acquire() as conn:
                await conn.add_listener("mlcp_test", lambda *_: None)
        # Left inside a transaction by a caller that did not use `transaction()`.
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE left_over (x int)")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
            assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetchval("SELECT count(*) FROM left_over")
            assert await conn.fetchval("SHOW timezone") == "UTC"
    finally:
        await pool.close()
