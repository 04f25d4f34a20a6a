"""Typed wrappers for the handler-API blocks of queries.sql (kept apart: queries.py is full)."""

from __future__ import annotations

from typing import Any

from db.queries import Executor, sql
from db.rows import ApiRow, ApiVersionRow, ModelJobRow


def _api(r: Any) -> ApiRow | None:
    return ApiRow.of(r) if r else None


async def get_api(db: Executor, owner: str, name: str) -> ApiRow | None:
    return _api(await db.fetchrow(sql("get_api"), owner, name))


async def get_api_by_model(db: Executor, model: str) -> ApiRow | None:
    return _api(await db.fetchrow(sql("get_api_by_model"), model))


async def list_apis(db: Executor, owner: str | None) -> list[ApiRow]:
    return [ApiRow.of(r) for r in await db.fetch(sql("list_apis"), owner)]


async def begin_api_version(
    db: Executor, owner: str, name: str, model: str, public: bool
) -> ApiRow:
    return ApiRow.of(await db.fetchrow(sql("begin_api_version"), owner, name, model, public))


async def insert_api_version(
    db: Executor,
    owner: str,
    name: str,
    version: int,
    content_sha256: str,
    storage_path: str,
    spec_file: str,
    requirements_sha256: str | None,
) -> None:
    await db.execute(
        sql("insert_api_version"),
        owner,
        name,
        version,
        content_sha256,
        storage_path,
        spec_file,
        requirements_sha256,
    )


async def get_api_version(
    db: Executor, owner: str, name: str, version: int
) -> ApiVersionRow | None:
    r = await db.fetchrow(sql("get_api_version"), owner, name, version)
    return ApiVersionRow.of(r) if r else None


async def set_api_status(
    db: Executor, owner: str, name: str, version: int, status: str, reason: str | None
) -> ApiRow | None:
    return _api(await db.fetchrow(sql("set_api_status"), owner, name, version, status, reason))


async def delete_api(db: Executor, owner: str, name: str) -> ApiRow | None:
    return _api(await db.fetchrow(sql("delete_api"), owner, name))


async def upsert_api_model(
    db: Executor, model: str, source_path: str, param_bytes: int | None
) -> None:
    await db.execute(sql("upsert_api_model"), model, source_path, param_bytes)


async def use_api_blob(db: Executor, sha256: str) -> int | None:
    """The stored blob's size (it counts as used now), or None when it is not stored."""
    r = await db.fetchrow(sql("use_api_blob"), sha256)
    return int(r["size_bytes"]) if r else None


async def insert_api_blob(db: Executor, sha256: str, size_bytes: int) -> bool:
    return bool(await db.fetchval(sql("insert_api_blob"), sha256, size_bytes))


async def unused_api_blobs(db: Executor, grace_s: float) -> list[str]:
    return [str(r["sha256"]) for r in await db.fetch(sql("unused_api_blobs"), float(grace_s))]


async def delete_api_blob(db: Executor, sha256: str, grace_s: float) -> None:
    await db.execute(sql("delete_api_blob"), sha256, float(grace_s))


async def get_model_job(db: Executor, job_id: int) -> ModelJobRow | None:
    r = await db.fetchrow(sql("get_model_job"), job_id)
    return ModelJobRow.of(r) if r else None
