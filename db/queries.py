"""Typed wrappers, one per named block of queries.sql."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any, Protocol

from db.rows import AuthKeyRow, KeyRow, ModelRow

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


class Executor(Protocol):
    """What both asyncpg.Pool and asyncpg.Connection offer."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> str: ...


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of `-- name: x` blocks into {name: sql}."""
    parts = _BLOCK.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


@cache
def sql(name: str) -> str:
    """The SQL text of one named block."""
    text = resources.files("db").joinpath("queries.sql").read_text("utf-8")
    return parse_queries(text)[name]


# -- keys ---------------------------------------------------------------------------------------


async def insert_key(db: Executor, name: str, prefix: str, key_hash: bytes, scope: str) -> KeyRow:
    return KeyRow.of(await db.fetchrow(sql("insert_key"), name, prefix, key_hash, scope))


async def get_active_key_by_hash(db: Executor, key_hash: bytes) -> AuthKeyRow | None:
    row = await db.fetchrow(sql("get_active_key_by_hash"), key_hash)
    return AuthKeyRow.of(row) if row else None


async def list_keys(db: Executor) -> list[KeyRow]:
    return [KeyRow.of(r) for r in await db.fetch(sql("list_keys"))]


async def revoke_key(db: Executor, key_id: int) -> KeyRow | None:
    row = await db.fetchrow(sql("revoke_key"), key_id)
    return KeyRow.of(row) if row else None


async def count_active_admin_keys(db: Executor) -> int:
    return int(await db.fetchval(sql("count_active_admin_keys")))


# -- models -------------------------------------------------------------------------------------


async def upsert_discovered_model(
    db: Executor,
    name: str,
    task: str,
    source_kind: str,
    source_path: str | None,
    gguf_file: str | None,
    param_bytes: int | None,
) -> None:
    await db.execute(
        sql("upsert_discovered_model"),
        name,
        task,
        source_kind,
        source_path,
        gguf_file,
        param_bytes,
    )


async def mark_models_absent_except(db: Executor, names: Sequence[str]) -> None:
    await db.execute(sql("mark_models_absent_except"), list(names))


async def list_models(db: Executor) -> list[ModelRow]:
    return [ModelRow.of(r) for r in await db.fetch(sql("list_models"))]


async def get_model(db: Executor, name: str) -> ModelRow | None:
    row = await db.fetchrow(sql("get_model"), name)
    return ModelRow.of(row) if row else None
