"""schema.sql and the migrations agree; migrating is idempotent and safe from two processes.

The agreement test follows procrastinate's tests/migration: build one database from schema.sql
and one through every migration, then compare what PostgreSQL itself reports about them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

import asyncpg
import pytest

from db import MigrationError, queries
from db import migrate as migrate_module
from db.migrate import Migration, load_migrations, load_schema, migrate
from tests.harness import create_database

# Everything PostgreSQL knows about the public schema that a migration can change.
CATALOG_QUERIES = {
    "tables": """
        SELECT table_name, table_type FROM information_schema.tables
        WHERE table_schema = 'public' AND table_name <> 'schema_migrations'
    """,
    "columns": """
        SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default,
               character_maximum_length, numeric_precision
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name <> 'schema_migrations'
    """,
    "constraints": """
        SELECT rel.relname, con.conname, con.contype, pg_get_constraintdef(con.oid)
        FROM pg_constraint con
        JOIN pg_class rel ON rel.oid = con.conrelid
        JOIN pg_namespace ns ON ns.oid = rel.relnamespace
        WHERE ns.nspname = 'public' AND rel.relname <> 'schema_migrations'
    """,
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename <> 'schema_migrations'
    """,
    "sequences": """
        SELECT sequence_name, data_type, start_value, increment FROM information_schema.sequences
        WHERE sequence_schema = 'public'
    """,
    "functions": """
        SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p
        JOIN pg_namespace ns ON ns.oid = p.pronamespace
        WHERE ns.nspname = 'public'
    """,
    "triggers": """
        SELECT t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t
        JOIN pg_class rel ON rel.oid = t.tgrelid
        JOIN pg_namespace ns ON ns.oid = rel.relnamespace
        WHERE ns.nspname = 'public' AND NOT t.tgisinternal
    """,
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'public'
    """,
    "types": """
        SELECT t.typname, t.typtype,
               array(SELECT e.enumlabel FROM pg_enum e WHERE e.enumtypid = t.oid
                     ORDER BY e.enumsortorder)
        FROM pg_type t JOIN pg_namespace ns ON ns.oid = t.typnamespace
        WHERE ns.nspname = 'public' AND t.typtype IN ('e', 'd', 'c')
          AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.reltype = t.oid)
    """,
}


async def catalog_of(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {
        what: sorted((tuple(r) for r in await conn.fetch(sql)), key=repr)
        for what, sql in CATALOG_QUERIES.items()
    }


NewDatabase = Callable[[], Awaitable[str]]


@pytest.fixture
async def new_database(pg_dsn: str) -> AsyncIterator[NewDatabase]:
    """Creates empty databases on the test server; drops them afterwards."""
    made: list[str] = []

    async def make() -> str:
        name, dsn = await create_database(pg_dsn, "mlcp_m")
        made.append(name)
        return dsn

    yield make
    admin = await asyncpg.connect(pg_dsn)
    try:
        for name in made:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_schema_sql_and_migrations_produce_the_same_catalog(
    new_database: NewDatabase,
) -> None:
    from_schema = await asyncpg.connect(await new_database())
    from_migrations = await asyncpg.connect(await new_database())
    try:
        await from_schema.execute(load_schema())
        applied = await migrate(from_migrations)
        assert applied == [m.name for m in load_migrations()]
        expected = await catalog_of(from_schema)
        actual = await catalog_of(from_migrations)
    finally:
        await from_schema.close()
        await from_migrations.close()
    assert expected["tables"], "schema.sql created no tables"
    for what in CATALOG_QUERIES:
        only_schema = sorted(set(expected[what]) - set(actual[what]), key=repr)
        only_migrations = sorted(set(actual[what]) - set(expected[what]), key=repr)
        assert (only_schema, only_migrations) == ([], []), (
            f"{what} differ: only in schema.sql {only_schema}; only in migrations {only_migrations}"
        )


async def test_two_migrators_at_once_apply_each_migration_once(new_database: NewDatabase) -> None:
    dsn = await new_database()
    first = await asyncpg.connect(dsn)
    second = await asyncpg.connect(dsn)
    try:
        applied_a, applied_b = await asyncio.gather(migrate(first), migrate(second))
        names = [m.name for m in load_migrations()]
        # One of them did all the work while the other waited on the advisory lock.
        assert sorted([applied_a, applied_b], key=len) == [[], names]
        rows = await first.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.version, m.name) for m in load_migrations()
        ]
        # Both sessions released the lock.
        held = await first.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1",
            migrate_module.MIGRATION_LOCK_KEY,
        )
        assert held == 0
    finally:
        await first.close()
        await second.close()


async def test_many_migrators_at_once(new_database: NewDatabase) -> None:
    dsn = await new_database()
    conns = [await asyncpg.connect(dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert sum(len(r) for r in results) == len(load_migrations())
    finally:
        for c in conns:
            await c.close()


async def test_migrate_is_idempotent(new_database: NewDatabase) -> None:
    conn = await asyncpg.connect(await new_database())
    try:
        assert await migrate(conn) != []
        before = await catalog_of(conn)
        assert await migrate(conn) == []
        assert await catalog_of(conn) == before
    finally:
        await conn.close()


def test_migrations_are_numbered_from_one_each_number_once() -> None:
    found = load_migrations()
    versions = [m.version for m in found]
    assert versions[0] == 1 and versions == sorted(set(versions))
    for m in found:
        assert m.name.startswith(f"{m.version:04d}_") and m.name.endswith(".sql")
        assert m.sql.strip()


async def test_a_failing_migration_rolls_back_and_releases_the_lock(
    new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = [
        Migration(1, "0001_ok.sql", "CREATE TABLE t_ok (id int);"),
        Migration(2, "0002_bad.sql", "CREATE TABLE t_half (id int); SELECT no_such_column;"),
    ]
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: broken)
    conn = await asyncpg.connect(await new_database())
    try:
        with pytest.raises(MigrationError, match=r"0002_bad\.sql"):
            await migrate(conn)
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
        assert versions == [1]
        # The failed migration left nothing behind.
        assert await conn.fetchval("SELECT to_regclass('t_half')") is None
        assert await conn.fetchval("SELECT to_regclass('t_ok')") is not None
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = $1",
            migrate_module.MIGRATION_LOCK_KEY,
        )
        assert held == 0
    finally:
        await conn.close()


async def test_every_named_query_prepares_against_the_schema(db: asyncpg.Pool) -> None:
    # PREPARE checks every table, column and parameter type without running anything.
    blocks = queries.parse_queries(resources.files("db").joinpath("queries.sql").read_text("utf-8"))
    async with db.acquire() as conn:
        for name, sql in blocks.items():
            try:
                await conn.prepare(sql)
            except asyncpg.PostgresError as exc:
                pytest.fail(f"query {name!r} does not prepare: {exc}")
