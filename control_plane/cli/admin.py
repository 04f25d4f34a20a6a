"""Offline commands on the database itself: `mlcp serve`, `mlcp migrate`, `mlcp admin keys`.

They import the server's modules only when run, so the HTTP commands start fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer

from control_plane.cli.client import CliError
from control_plane.settings import Settings

admin_app = typer.Typer(help="work on the database directly (no server needed)")
admin_keys = typer.Typer(help="create, list and revoke keys in the database")
admin_app.add_typer(admin_keys, name="keys")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("migrate")(migrate)
    app.add_typer(admin_app, name="admin")


def _logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def serve() -> None:
    """Serve the API (the default without a command)."""
    import uvicorn

    from control_plane.app import create_app
    from control_plane.fast_lane import server_config

    _logging()
    settings = Settings()
    config = server_config(
        create_app(settings),
        settings.http_limits,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


def _with_db(work: Callable[[Any], Awaitable[None]]) -> None:
    from db import DatabaseError
    from db.database import open_database
    from db.pool import connect

    settings = Settings()

    async def main() -> None:
        async with open_database(settings) as dsn:
            conn = await connect(dsn)
            try:
                await work(conn)
            finally:
                await conn.close()

    try:
        asyncio.run(main())
    except DatabaseError as exc:
        raise CliError(str(exc)) from None


def migrate() -> None:
    """Apply database migrations."""

    async def work(conn: Any) -> None:
        print("mlcp: database is up to date")

    _with_db(work)


@admin_keys.command("create")
def create(
    name: Annotated[str, typer.Option("--name")] = "cli",
    scope: Annotated[str, typer.Option("--scope", help="user or admin")] = "user",
) -> None:
    """Create a key and print it once."""
    from control_plane import auth
    from control_plane.schemas import SCOPES, render_key
    from db import queries

    if scope not in SCOPES:
        raise typer.BadParameter(f"must be one of {', '.join(SCOPES)}", param_hint="--scope")

    async def work(conn: Any) -> None:
        secret, key_id = await auth.create_key(conn, name, scope)
        created = next(k for k in await queries.list_keys(conn) if k.id == key_id)
        print(json.dumps(render_key(created, secret), indent=2))

    _with_db(work)


@admin_keys.command("list")
def list_keys() -> None:
    """List keys (never their secrets)."""
    from control_plane.schemas import render_key
    from db import queries

    async def work(conn: Any) -> None:
        print(json.dumps([render_key(k) for k in await queries.list_keys(conn)], indent=2))

    _with_db(work)


@admin_keys.command("revoke")
def revoke(key_id: Annotated[int, typer.Argument(min=1)]) -> None:
    """Revoke a key by id."""
    from control_plane import auth
    from control_plane.errors import LastAdminKey, NotFound
    from control_plane.schemas import render_key

    async def work(conn: Any) -> None:
        try:
            row = await auth.revoke_key(conn, key_id)
        except NotFound:
            raise CliError(f"no active key with id {key_id}") from None
        except LastAdminKey as exc:
            raise CliError(exc.message) from None
        print(json.dumps(render_key(row), indent=2))

    _with_db(work)
