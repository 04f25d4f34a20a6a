"""Start-up steps that touch the database once: bootstrap the admin key, the catalog."""

from __future__ import annotations

import logging

from benchmarker.catalog import discover, sync_catalog
from control_plane import auth
from control_plane.settings import Settings
from db import queries
from db.pool import Pool

logger = logging.getLogger(__name__)

# Serializes bootstrap between control planes sharing a database.
BOOTSTRAP_LOCK_KEY = 0x6D6C6371


async def bootstrap_admin_key(pool: Pool, settings: Settings) -> str | None:
    """Make sure an admin key exists; return a newly generated secret to show once, else None."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", BOOTSTRAP_LOCK_KEY)
            if settings.admin_key is not None:
                secret = settings.admin_key.get_secret_value()
                digest = auth.hash_key(secret)
                active = await queries.get_active_key_by_hash(conn, digest)
                if active is None:
                    # MLCP_ADMIN_KEY is authoritative: a revoked one is restored, so an operator
                    # locked out can always get back in by restarting with it set.
                    if await queries.restore_admin_key(conn, digest) is not None:
                        logger.warning("MLCP_ADMIN_KEY had been revoked; restored it as admin")
                    else:
                        await auth.create_key(conn, "bootstrap admin", "admin", secret)
                        logger.info("MLCP_ADMIN_KEY stored as a new admin key")
                elif active.scope != "admin":
                    await queries.restore_admin_key(conn, digest)
                    logger.warning("MLCP_ADMIN_KEY was a user key; made it admin again")
                return None
            if await queries.count_active_admin_keys(conn) > 0:
                return None
            secret, _ = await auth.create_key(conn, "bootstrap admin", "admin")
            return secret


async def refresh_catalog(pool: Pool, settings: Settings) -> None:
    found = discover(
        settings.model_dir_paths,
        settings.resolved_hf_cache,
        packaged=settings.include_packaged_models,
    )
    async with pool.acquire() as conn, conn.transaction():
        await sync_catalog(conn, found)
