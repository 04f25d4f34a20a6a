"""API keys end to end: /admin/keys, scopes, revocation, header forms, bootstrap and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from control_plane import auth
from control_plane.bootstrap import bootstrap_admin_key
from db import queries
from tests.harness import ADMIN_KEY, Api, make_settings, serve

SECRET_FIELDS = {"key", "key_hash", "hash", "secret", "keyHash"}


async def create_user_key(api: Api, name: str = "alice") -> dict[str, Any]:
    status, body = await api.call("POST", "/admin/keys", {"name": name})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def test_admin_creates_a_user_key_shown_once(api: Api) -> None:
    created = await create_user_key(api)
    secret = created["key"]
    assert secret.startswith(auth.KEY_PREFIX) and len(secret) >= 40
    assert created["scope"] == "user"
    assert created["name"] == "alice"
    assert created["revoked"] is None
    assert created["created"].endswith("Z")
    assert secret.startswith(created["prefix"]) and len(created["prefix"]) < len(secret) // 2

    status, listing = await api.call("GET", "/admin/keys")
    assert status == 200
    by_id = {k["id"]: k for k in listing}
    assert by_id[created["id"]]["name"] == "alice"
    for entry in listing:
        assert not SECRET_FIELDS & set(entry), entry
    text = json.dumps(listing)
    assert secret not in text
    assert ADMIN_KEY not in text
    assert auth.hash_key(secret).hex() not in text


async def test_keys_are_stored_as_hashes_only(api: Api, db: asyncpg.Pool) -> None:
    created = await create_user_key(api)
    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", created["id"])
    assert bytes(row["key_hash"]) == auth.hash_key(created["key"])
    for value in row.values():
        assert created["key"] not in str(value)


async def test_admin_can_create_an_admin_key(api: Api) -> None:
    status, created = await api.call("POST", "/admin/keys", {"name": "ops", "scope": "admin"})
    assert status == 201 and created["scope"] == "admin"
    status, _ = await api.call("GET", "/admin/keys", key=created["key"])
    assert status == 200


async def test_create_with_empty_body_uses_defaults(api: Api) -> None:
    status, created = await api.call("POST", "/admin/keys", data=b"")
    assert status == 201, created
    assert created["scope"] == "user"


async def test_user_key_lists_models_but_cannot_manage_keys(api: Api) -> None:
    user = (await create_user_key(api))["key"]
    for method in ("GET", "POST"):
        status, models = await api.call(method, "/model/list", key=user)
        assert status == 200 and isinstance(models, list)
    for method, path, body in [
        ("GET", "/admin/keys", None),
        ("POST", "/admin/keys", {"name": "mallory"}),
        ("POST", "/admin/keys", {"name": "mallory", "scope": "admin"}),
        ("DELETE", "/admin/keys/1", None),
    ]:
        status, err = await api.call(method, path, body, key=user)
        assert status == 403, (method, path, err)
        assert err["code"] == "forbidden" and isinstance(err["error"], str)
    # Nothing was created by the refused calls.
    status, listing = await api.call("GET", "/admin/keys")
    assert [k["name"] for k in listing if k["name"] == "mallory"] == []


async def test_revoked_key_fails_at_once_and_twice_is_404(api: Api) -> None:
    created = await create_user_key(api)
    user = created["key"]
    # Warm the authentication cache so revocation has to clear it.
    assert (await api.call("GET", "/model/list", key=user))[0] == 200
    status, revoked = await api.call("DELETE", f"/admin/keys/{created['id']}")
    assert status == 200
    assert revoked["id"] == created["id"] and revoked["revoked"] is not None
    assert "key" not in revoked
    status, err = await api.call("GET", "/model/list", key=user)
    assert status == 401 and err["code"] == "unauthorized"
    status, err = await api.call("DELETE", f"/admin/keys/{created['id']}")
    assert status == 404 and err["code"] == "key_not_found"
    # The listing still shows it, marked revoked.
    status, listing = await api.call("GET", "/admin/keys")
    assert {k["id"]: k for k in listing}[created["id"]]["revoked"] == revoked["revoked"]


@pytest.mark.parametrize(
    "key_id", ["999999", "0", "-1", "abc", "1.5", "9" * 30, "%20", "%C2%B2", "%D9%A1", "+1", " 1"]
)
async def test_revoking_unknown_ids_is_404(api: Api, key_id: str) -> None:
    status, err = await api.call("DELETE", f"/admin/keys/{key_id}")
    assert status == 404, err
    assert set(err) == {"error", "code"}


async def test_bearer_and_x_api_key_are_accepted(api: Api) -> None:
    user = (await create_user_key(api))["key"]
    for headers in [
        {"Authorization": f"Key {user}"},
        {"Authorization": f"Bearer {user}"},
        {"authorization": f"bearer {user}"},
        {"x-api-key": user},
        {"X-API-Key": user},
    ]:
        status, _ = await api.call("GET", "/model/list", key=None, headers=headers)
        assert status == 200, headers
    status, _ = await api.call(
        "GET", "/admin/keys", key=None, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert status == 200


async def test_revoking_your_own_admin_key(api: Api) -> None:
    status, other = await api.call("POST", "/admin/keys", {"name": "ops", "scope": "admin"})
    assert status == 201
    status, _ = await api.call("DELETE", f"/admin/keys/{other['id']}", key=other["key"])
    assert status == 200
    assert (await api.call("GET", "/admin/keys", key=other["key"]))[0] == 401
    assert (await api.call("GET", "/admin/keys"))[0] == 200


# -- bootstrap ----------------------------------------------------------------------------------


async def test_configured_admin_key_works_and_is_stored_once(
    db: asyncpg.Pool, db_dsn: str, tmp_path: Path
) -> None:
    settings = make_settings(db_dsn, tmp_path)
    assert await bootstrap_admin_key(db, settings) is None
    assert await bootstrap_admin_key(db, settings) is None
    admins = await db.fetch("SELECT * FROM api_keys WHERE scope = 'admin'")
    assert len(admins) == 1
    assert bytes(admins[0]["key_hash"]) == auth.hash_key(ADMIN_KEY)


async def test_generated_admin_key_is_announced_once(
    db_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(db_dsn, tmp_path / "data", admin_key=None)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        printed = capsys.readouterr().out
        generated = [w for w in printed.split() if w.startswith(auth.KEY_PREFIX)]
        assert len(generated) == 1, printed
        key = generated[0]
        async with session.get(
            base + "/admin/keys", headers={"Authorization": f"Key {key}"}
        ) as resp:
            assert resp.status == 200
            listing = await resp.json()
        assert [k["scope"] for k in listing] == ["admin"]
        assert key not in json.dumps(listing)
    async with serve(settings) as base, aiohttp.ClientSession() as session:
        printed = capsys.readouterr().out
        assert auth.KEY_PREFIX not in printed, printed
        async with session.get(
            base + "/model/list", headers={"Authorization": f"Key {key}"}
        ) as resp:
            assert resp.status == 200


async def test_bootstrap_generates_only_when_no_admin_key_exists(
    db: asyncpg.Pool, db_dsn: str, tmp_path: Path
) -> None:
    settings = make_settings(db_dsn, tmp_path, admin_key=None)
    secret = await bootstrap_admin_key(db, settings)
    assert secret is not None and secret.startswith(auth.KEY_PREFIX)
    assert await bootstrap_admin_key(db, settings) is None
    assert await queries.count_active_admin_keys(db) == 1
    # Once every admin key is revoked, the next start generates a fresh one.
    await db.execute("UPDATE api_keys SET revoked_at = now()")
    again = await bootstrap_admin_key(db, settings)
    assert again is not None and again != secret


async def test_revoked_configured_admin_key_is_restored_at_start(
    db: asyncpg.Pool, db_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(db_dsn, tmp_path)
    assert await bootstrap_admin_key(db, settings) is None
    await db.execute("UPDATE api_keys SET revoked_at = now(), scope = 'user'")
    # MLCP_ADMIN_KEY is authoritative: a restart with it set lets the operator back in.
    with caplog.at_level("WARNING", logger="control_plane.bootstrap"):
        assert await bootstrap_admin_key(db, settings) is None
    row = await queries.get_active_key_by_hash(db, auth.hash_key(ADMIN_KEY))
    assert row is not None and row.scope == "admin"
    assert await db.fetchval("SELECT count(*) FROM api_keys") == 1
    assert "restored" in caplog.text


async def test_last_admin_key_cannot_be_revoked(api: Api, db: asyncpg.Pool) -> None:
    (own_id,) = [r["id"] for r in await db.fetch("SELECT id FROM api_keys WHERE scope = 'admin'")]
    status, body = await api.call("DELETE", f"/admin/keys/{own_id}")
    assert (status, body["code"]) == (409, "last_admin_key"), body
    assert (await api.call("GET", "/admin/keys"))[0] == 200
    # With a second admin key either one may go, but never both.
    status, other = await api.call("POST", "/admin/keys", {"name": "ops", "scope": "admin"})
    assert status == 201
    results = await asyncio.gather(
        api.call("DELETE", f"/admin/keys/{own_id}", key=other["key"]),
        api.call("DELETE", f"/admin/keys/{other['id']}"),
    )
    assert sorted(r[0] for r in results) == [200, 409], results
    assert await queries.count_active_admin_keys(db) == 1


async def test_restart_with_admin_key_after_it_was_revoked(api: Api, db: asyncpg.Pool) -> None:
    status, other = await api.call("POST", "/admin/keys", {"name": "ops", "scope": "admin"})
    assert status == 201
    (own_id,) = [
        r["id"]
        for r in await db.fetch(
            "SELECT id FROM api_keys WHERE key_hash = $1", auth.hash_key(ADMIN_KEY)
        )
    ]
    assert (await api.call("DELETE", f"/admin/keys/{own_id}", key=other["key"]))[0] == 200
    assert (await api.call("GET", "/admin/keys"))[0] == 401
    async with serve(api.settings) as base, aiohttp.ClientSession() as session:
        restarted = Api(base, session, api.settings)
        assert (await restarted.call("GET", "/admin/keys"))[0] == 200


async def test_concurrent_bootstraps_generate_one_key(
    db: asyncpg.Pool, db_dsn: str, tmp_path: Path
) -> None:
    import asyncio

    settings = make_settings(db_dsn, tmp_path, admin_key=None)
    results = await asyncio.gather(*(bootstrap_admin_key(db, settings) for _ in range(4)))
    assert len([r for r in results if r]) == 1
    assert await queries.count_active_admin_keys(db) == 1


# -- the offline CLI (mlcp admin keys) ---------------------------------------------------------


def mlcp(db_dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCP_")}
    env["MLCP_DATABASE_URL"] = db_dsn
    return subprocess.run(
        [sys.executable, "-m", "control_plane", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_create_list_revoke(api: Api, db_dsn: str) -> None:
    import asyncio

    made = await asyncio.to_thread(mlcp, db_dsn, "admin", "keys", "create", "--name", "from-cli")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["name"] == "from-cli" and created["scope"] == "user"
    # The running server accepts a key created by the CLI on the same database.
    assert (await api.call("GET", "/model/list", key=created["key"]))[0] == 200

    listed = await asyncio.to_thread(mlcp, db_dsn, "admin", "keys", "list")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert "from-cli" in [e["name"] for e in entries]
    assert created["key"] not in listed.stdout
    assert all("key" not in e for e in entries)

    revoked = await asyncio.to_thread(mlcp, db_dsn, "admin", "keys", "revoke", str(created["id"]))
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked"] is not None
    again = await asyncio.to_thread(mlcp, db_dsn, "admin", "keys", "revoke", str(created["id"]))
    assert again.returncode == 1
    assert "no active key" in again.stderr
