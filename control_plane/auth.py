"""API keys: generation, hashing, extraction from headers, and verification.

Only SHA-256 hashes of keys are stored. Keys are 256-bit random secrets, so a fast hash is the
right tool (a password hash would only add latency to every request); the hash found in the
database is compared to the presented one with `hmac.compare_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

import asyncpg
from starlette.datastructures import Headers

from control_plane.errors import (
    DatabaseUnavailable,
    Forbidden,
    KeyNotFound,
    LastAdminKey,
    Unauthorized,
)
from control_plane.outage import OUTAGE_ERRORS, DatabaseOutage
from db import queries
from db.queries import Executor
from db.rows import KeyLimits, KeyRow

KEY_PREFIX = "mlcp_"
MAX_KEY_LEN = 256
SCOPE_RANK = {"user": 0, "admin": 1}


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str
    scope: str
    # The key's own limits as stored (control_plane/limits.py resolves the defaults).
    limits: KeyLimits = field(default_factory=KeyLimits)

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def display_prefix(key: str) -> str:
    """The few characters shown in listings so a person can tell keys apart."""
    return key[: len(KEY_PREFIX) + 6] if key.startswith(KEY_PREFIX) else key[:6]


def extract_key(headers: Headers) -> str | None:
    """The key from `Authorization: Key|Bearer <key>` or `x-api-key`, or None."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() in ("key", "bearer") and value.strip():
            return value.strip()
        return None
    api_key = headers.get("x-api-key")
    return api_key.strip() if api_key and api_key.strip() else None


def scope_allows(have: str, need: str) -> bool:
    # A `metrics` key (what a Prometheus scraper holds) may read /metrics and nothing else.
    if need == "metrics":
        return have in ("admin", "metrics")
    return SCOPE_RANK.get(have, -1) >= SCOPE_RANK[need]


class Authenticator:
    """Verifies keys against the database, trusting a verified key for `cache_s` seconds.

    While the database is unreachable, a key verified within the last `stale_s` seconds is
    still served (stale-while-error), so running instances keep answering known keys through an
    outage (issue 17); a key never verified gets 503. A revocation made meanwhile applies at the
    first verification after the database returns.
    """

    def __init__(
        self,
        db: Executor,
        cache_s: float,
        *,
        stale_s: float = 300.0,
        outage: DatabaseOutage | None = None,
    ) -> None:
        self._db = db
        self._cache_s = cache_s
        self._stale_s = stale_s
        self.outage = outage or DatabaseOutage()
        self._cache: dict[bytes, tuple[float, Principal]] = {}
        # During an outage, requests with known keys do not each wait on a failing connect:
        # one verification is tried per interval, the others are served from the cache.
        self._next_try = 0.0

    def forget(self, key_id: int | None = None) -> None:
        """Drop cached verifications (all, or those of one key) after a revocation."""
        if key_id is None:
            self._cache.clear()
            return
        for digest, (_, principal) in list(self._cache.items()):
            if principal.key_id == key_id:
                del self._cache[digest]

    async def authenticate(self, headers: Headers, need: str = "user") -> Principal:
        key = extract_key(headers)
        if key is None or len(key) > MAX_KEY_LEN or not key.isprintable():
            raise Unauthorized()
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and now - cached[0] < self._cache_s:
            principal = cached[1]
        else:
            principal = await self._verify(digest, cached, now)
        if not scope_allows(principal.scope, need):
            raise Forbidden(f"this route needs an {need} key")
        return principal

    async def _verify(
        self, digest: bytes, cached: tuple[float, Principal] | None, now: float
    ) -> Principal:
        usable = cached is not None and now - cached[0] < self._stale_s
        if cached is not None and usable and self.outage.down and now < self._next_try:
            return cached[1]
        try:
            row = await queries.get_active_key_by_hash(self._db, digest)
        except OUTAGE_ERRORS as exc:
            self.outage.failed("verifying a key", exc, now)
            self._next_try = now + min(self._cache_s, 1.0)
            if cached is not None and usable:
                return cached[1]
            raise DatabaseUnavailable("the database is unreachable") from exc
        self.outage.ok(now)
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            self._cache.pop(digest, None)
            raise Unauthorized()
        principal = Principal(row.id, row.name, row.scope, row.limits)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now, principal)
        return principal


async def create_key(
    db: Executor, name: str, scope: str, secret: str | None = None
) -> tuple[str, int]:
    """Store a new key (or the given secret) and return (secret, id); the secret is not kept."""
    secret = secret or generate_key()
    row = await queries.insert_key(db, name, display_prefix(secret), hash_key(secret), scope)
    return secret, row.id


async def revoke_key(conn: asyncpg.Connection, key_id: int) -> KeyRow:
    """Revoke a key, refusing the last active admin key (nobody could manage keys after it)."""
    async with conn.transaction():
        # Two admins revoking each other's keys at once must not both succeed.
        await queries.lock_admin_keys(conn)
        row = await queries.revoke_key(conn, key_id)
        if row is not None:
            return row
        if await queries.get_active_key(conn, key_id) is None:
            raise KeyNotFound("no such key, or already revoked")
        raise LastAdminKey()
