"""Key extraction from headers, hashing, and the Authenticator over a small in-memory key table."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from starlette.datastructures import Headers

from control_plane import auth
from control_plane.auth import Authenticator, extract_key, hash_key
from control_plane.errors import Forbidden, Unauthorized


def headers(*pairs: tuple[str, str]) -> Headers:
    return Headers(raw=[(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs])


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ([("Authorization", "Key abc")], "abc"),
        ([("Authorization", "key abc")], "abc"),
        ([("Authorization", "KEY abc")], "abc"),
        ([("Authorization", "Bearer abc")], "abc"),
        ([("Authorization", "bearer abc")], "abc"),
        ([("Authorization", "  Key   abc  ")], "abc"),
        ([("x-api-key", "abc")], "abc"),
        ([("X-API-Key", " abc ")], "abc"),
        ([("Authorization", "Key mlcp_a-b_c")], "mlcp_a-b_c"),
    ],
)
def test_extract_key_accepts(pairs: list[tuple[str, str]], expected: str) -> None:
    assert extract_key(headers(*pairs)) == expected


@pytest.mark.parametrize(
    "pairs",
    [
        [],
        [("Authorization", "")],
        [("Authorization", "Key")],
        [("Authorization", "Key ")],
        [("Authorization", "Key    ")],
        [("Authorization", "Bearer")],
        [("Authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")],
        [("Authorization", "Token abc")],
        [("Authorization", "abc")],
        [("Authorization", "Keyabc")],
        [("Authorization", "Key\tabc")],
        [("x-api-key", "")],
        [("x-api-key", "   ")],
        # A malformed Authorization header is not rescued by x-api-key: the client meant one key.
        [("Authorization", "Basic abc"), ("x-api-key", "abc")],
    ],
)
def test_extract_key_refuses(pairs: list[tuple[str, str]]) -> None:
    assert extract_key(headers(*pairs)) is None


def test_authorization_header_wins_over_x_api_key() -> None:
    assert extract_key(headers(("Authorization", "Key one"), ("x-api-key", "two"))) == "one"


def test_hash_is_sha256_of_the_key() -> None:
    assert hash_key("mlcp_x") == hashlib.sha256(b"mlcp_x").digest()
    assert len(hash_key("k")) == 32
    assert hash_key("a") != hash_key("b")
    # Unicode keys hash (and then fail to match) instead of raising.
    assert len(hash_key("ключ")) == 32


def test_generated_keys_are_long_random_and_prefixed() -> None:
    keys = {auth.generate_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith(auth.KEY_PREFIX)
        assert len(key) >= 40
        assert key.isprintable() and " " not in key
        assert extract_key(headers(("Authorization", f"Key {key}"))) == key


def test_display_prefix_is_short() -> None:
    key = auth.generate_key()
    prefix = auth.display_prefix(key)
    assert key.startswith(prefix) and len(prefix) == len(auth.KEY_PREFIX) + 6
    assert auth.display_prefix("abcdefghij") == "abcdef"


def test_scope_allows() -> None:
    assert auth.scope_allows("admin", "admin")
    assert auth.scope_allows("admin", "user")
    assert auth.scope_allows("user", "user")
    assert not auth.scope_allows("user", "admin")
    assert not auth.scope_allows("nonsense", "user")


class KeyTable:
    """What queries.get_active_key_by_hash reads, held in memory; counts lookups."""

    def __init__(self) -> None:
        self.rows: dict[bytes, dict[str, Any]] = {}
        self.lookups = 0

    def add(self, key_id: int, secret: str, scope: str) -> None:
        digest = hash_key(secret)
        self.rows[digest] = {
            "id": key_id,
            "name": f"k{key_id}",
            "prefix": secret[:6],
            "key_hash": digest,
            "scope": scope,
        }

    def revoke(self, key_id: int) -> None:
        self.rows = {h: r for h, r in self.rows.items() if r["id"] != key_id}

    async def fetchrow(self, query: str, *args: Any) -> Any:
        assert "api_keys" in query
        self.lookups += 1
        return self.rows.get(args[0])

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        raise AssertionError("not used")

    async def fetchval(self, query: str, *args: Any) -> Any:
        raise AssertionError("not used")

    async def execute(self, query: str, *args: Any) -> str:
        raise AssertionError("not used")


@pytest.fixture
def table() -> KeyTable:
    t = KeyTable()
    t.add(1, "admin-secret", "admin")
    t.add(2, "user-secret", "user")
    return t


async def test_authenticate_scopes(table: KeyTable) -> None:
    authn = Authenticator(table, cache_s=0)
    admin = await authn.authenticate(headers(("Authorization", "Key admin-secret")), "admin")
    assert (admin.key_id, admin.scope, admin.is_admin) == (1, "admin", True)
    user = await authn.authenticate(headers(("x-api-key", "user-secret")), "user")
    assert (user.key_id, user.is_admin) == (2, False)
    with pytest.raises(Forbidden):
        await authn.authenticate(headers(("Authorization", "Bearer user-secret")), "admin")


@pytest.mark.parametrize(
    "value",
    [
        "Key wrong-secret",
        "Key " + "a" * (auth.MAX_KEY_LEN + 1),
        "Key abc\x7fdef",
        "Key admin-secret\x01",
        "Basic admin-secret",
        "",
    ],
)
async def test_authenticate_refuses(table: KeyTable, value: str) -> None:
    authn = Authenticator(table, cache_s=0)
    with pytest.raises(Unauthorized) as info:
        await authn.authenticate(headers(("Authorization", value)))
    assert info.value.status_code == 401
    assert info.value.code == "unauthorized"


async def test_oversized_and_unprintable_keys_never_reach_the_database(table: KeyTable) -> None:
    authn = Authenticator(table, cache_s=0)
    for value in ["Key " + "a" * 300, "Key abc\x7f"]:
        with pytest.raises(Unauthorized):
            await authn.authenticate(headers(("Authorization", value)))
    assert table.lookups == 0


async def test_cache_trusts_a_verified_key_until_forgotten(table: KeyTable) -> None:
    authn = Authenticator(table, cache_s=60)
    hdrs = headers(("Authorization", "Key user-secret"))
    await authn.authenticate(hdrs)
    await authn.authenticate(hdrs)
    assert table.lookups == 1
    table.revoke(2)
    # Revoked behind this control plane's back: still trusted within cache_s ...
    await authn.authenticate(hdrs)
    # ... until the revocation goes through `forget`, as /admin/keys/{id} DELETE does.
    authn.forget(2)
    with pytest.raises(Unauthorized):
        await authn.authenticate(hdrs)


async def test_forget_one_key_keeps_the_others(table: KeyTable) -> None:
    authn = Authenticator(table, cache_s=60)
    await authn.authenticate(headers(("Authorization", "Key admin-secret")), "admin")
    await authn.authenticate(headers(("Authorization", "Key user-secret")))
    authn.forget(2)
    lookups = table.lookups
    await authn.authenticate(headers(("Authorization", "Key admin-secret")), "admin")
    assert table.lookups == lookups
    authn.forget()
    await authn.authenticate(headers(("Authorization", "Key admin-secret")), "admin")
    assert table.lookups == lookups + 1


async def test_zero_cache_asks_every_time(table: KeyTable) -> None:
    authn = Authenticator(table, cache_s=0)
    hdrs = headers(("Authorization", "Key user-secret"))
    for _ in range(3):
        await authn.authenticate(hdrs)
    assert table.lookups == 3


async def test_failed_lookups_are_not_cached(table: KeyTable) -> None:
    authn = Authenticator(table, cache_s=60)
    hdrs = headers(("Authorization", "Key later-secret"))
    with pytest.raises(Unauthorized):
        await authn.authenticate(hdrs)
    table.add(3, "later-secret", "user")
    assert (await authn.authenticate(hdrs)).key_id == 3
