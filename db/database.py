"""Opening the database, the one way every entry point does it (server, CLI, benchmark worker).

`MLCP_DATABASE_URL` when set; otherwise the embedded PostgreSQL under `MLCP_DATA_DIR`, started
here and stopped when the block ends. Either way the schema is migrated before the DSN is handed
out, so no caller can see an old schema.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from db.embedded import EmbeddedPostgres
from db.migrate import migrate
from db.pool import connect


class DatabaseSettings(Protocol):
    """The two settings that say where the database is."""

    @property
    def database_url(self) -> SecretStr | None: ...

    @property
    def data_dir(self) -> Path: ...


async def migrate_database(dsn: str) -> None:
    """Bring the schema at `dsn` up to date (concurrent callers wait on one advisory lock)."""
    conn = await connect(dsn)
    try:
        await migrate(conn)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def open_database(settings: DatabaseSettings) -> AsyncIterator[str]:
    """Yield the DSN of a migrated database; an embedded server started here stops at the end."""
    if settings.database_url is not None:
        dsn = settings.database_url.get_secret_value()
        await migrate_database(dsn)
        yield dsn
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    dsn = await asyncio.to_thread(embedded.start)
    try:
        await migrate_database(dsn)
        yield dsn
    finally:
        embedded.stop()
