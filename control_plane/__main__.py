"""`mlcp serve` runs the API; `mlcp keys create|list|revoke` manages keys; `mlcp migrate`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from control_plane import auth
from control_plane.app import create_app
from control_plane.bootstrap import migrate_database
from control_plane.errors import NotFound
from control_plane.schemas import SCOPES, render_key
from control_plane.settings import Settings
from db import DatabaseError, queries
from db.embedded import EmbeddedPostgres
from db.pool import connect


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


async def _with_db(settings: Settings, work: Callable[[Any], Awaitable[int]]) -> int:
    embedded: EmbeddedPostgres | None = None
    if settings.database_url is not None:
        dsn = settings.database_url.get_secret_value()
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        dsn = embedded.start()
    try:
        await migrate_database(dsn)
        conn = await connect(dsn)
        try:
            return await work(conn)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.stop()


def _keys(settings: Settings, args: argparse.Namespace) -> int:
    async def work(conn: Any) -> int:
        if args.keys_cmd == "create":
            secret, key_id = await auth.create_key(conn, args.name, args.scope)
            created = next(k for k in await queries.list_keys(conn) if k.id == key_id)
            print(json.dumps(render_key(created, secret), indent=2))
            return 0
        if args.keys_cmd == "list":
            print(json.dumps([render_key(k) for k in await queries.list_keys(conn)], indent=2))
            return 0
        try:
            row = await auth.revoke_key(conn, args.id)
        except NotFound:
            print(f"mlcp: no active key with id {args.id}", file=sys.stderr)
            return 1
        except auth.LastAdminKey as exc:
            print(f"mlcp: {exc.message}", file=sys.stderr)
            return 1
        print(json.dumps(render_key(row), indent=2))
        return 0

    return asyncio.run(_with_db(settings, work))


def _migrate(settings: Settings, _args: argparse.Namespace) -> int:
    async def work(conn: Any) -> int:
        print("mlcp: database is up to date")
        return 0

    return asyncio.run(_with_db(settings, work))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlcp", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("serve", help="serve the API (the default)").set_defaults(run=_serve)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(run=_migrate)
    keys = sub.add_parser("keys", help="manage API keys")
    keys.set_defaults(run=_keys)
    keys_sub = keys.add_subparsers(dest="keys_cmd", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", default="cli")
    create.add_argument("--scope", choices=SCOPES, default="user")
    keys_sub.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", type=int)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    settings = Settings()
    run: Callable[[Settings, argparse.Namespace], int] = getattr(args, "run", _serve)
    try:
        return run(settings, args)
    except DatabaseError as exc:
        print(f"mlcp: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
