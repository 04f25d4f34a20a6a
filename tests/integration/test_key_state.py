"""Keys can be disabled, enabled and given an expiry; bad changes are clear 4xx, never a 500."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import ADMIN_KEY, Api


async def new_key(api: Api, name: str, scope: str = "user") -> dict[str, Any]:
    status, body = await api.call("POST", "/admin/keys", {"name": name, "scope": scope})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def test_disable_enable_and_expire(api: Api) -> None:
    alice = await new_key(api, "alice")
    path = f"/admin/keys/{alice['id']}"
    assert (await api.call("GET", "/model/list", key=alice["key"]))[0] == 200

    status, body = await api.call("PATCH", path, {"disabled": True})
    assert status == 200 and body["disabled"] is not None and body["revoked"] is None
    # Changed through this control plane: refused at once (its cache is dropped).
    status, body = await api.call("GET", "/model/list", key=alice["key"])
    assert status == 401 and body["code"] == "unauthorized"

    status, body = await api.call("PATCH", path, {"disabled": False})
    assert status == 200 and body["disabled"] is None
    assert (await api.call("GET", "/model/list", key=alice["key"]))[0] == 200

    status, body = await api.call("PATCH", path, {"expiresAt": "2001-01-01T00:00:00Z"})
    assert status == 200 and body["expiresAt"] == "2001-01-01T00:00:00.000Z"
    assert (await api.call("GET", "/model/list", key=alice["key"]))[0] == 401
    status, body = await api.call("PATCH", path, {"expiresAt": "2999-01-01T00:00:00Z"})
    assert status == 200
    assert (await api.call("GET", "/model/list", key=alice["key"]))[0] == 200
    status, body = await api.call("PATCH", path, {"expiresAt": None})
    assert status == 200 and body["expiresAt"] is None

    listed = {k["id"]: k for k in (await api.call("GET", "/admin/keys"))[1]}
    assert listed[alice["id"]]["disabled"] is None


async def test_the_last_usable_admin_key_cannot_be_disabled(api: Api) -> None:
    keys = (await api.call("GET", "/admin/keys"))[1]
    admin_id = next(k["id"] for k in keys if k["scope"] == "admin")
    status, body = await api.call("PATCH", f"/admin/keys/{admin_id}", {"disabled": True})
    assert status == 409 and body["code"] == "last_admin_key"
    second = await new_key(api, "ops", "admin")
    status, body = await api.call("PATCH", f"/admin/keys/{admin_id}", {"disabled": True})
    assert status == 200, body
    assert (await api.call("GET", "/model/list", key=ADMIN_KEY))[0] == 401
    status, _ = await api.call(
        "PATCH", f"/admin/keys/{admin_id}", {"disabled": False}, key=second["key"]
    )
    assert status == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 422, "invalid_field"),
        ({"disabled": "yes"}, 422, "invalid_field"),
        ({"disabled": 1}, 422, "invalid_field"),
        ({"expiresAt": "tomorrow"}, 422, "invalid_field"),
        ({"expiresAt": "2030-01-01T00:00:00"}, 422, "invalid_field"),
        ({"expiresAt": "0001-01-01T00:00:00Z"}, 422, "invalid_field"),
        ({"expiresAt": 12}, 422, "invalid_field"),
        ({"expiresAt": "9" * 500}, 422, "invalid_field"),
        ({"scope": "admin"}, 422, "unknown_field"),
        ([True], 422, "invalid_body"),
    ],
)
async def test_bad_changes_are_clear(api: Api, body: Any, status: int, code: str) -> None:
    alice = await new_key(api, "alice")
    got, answer = await api.call("PATCH", f"/admin/keys/{alice['id']}", body)
    assert (got, answer["code"]) == (status, code), answer


async def test_unknown_revoked_and_user_keys(api: Api) -> None:
    alice = await new_key(api, "alice")
    for path in ("/admin/keys/999999", "/admin/keys/abc", "/admin/keys/%C2%B2"):
        got, answer = await api.call("PATCH", path, {"disabled": True})
        assert got == 404 and answer["code"] == "key_not_found", path
    got, _ = await api.call(
        "PATCH", f"/admin/keys/{alice['id']}", {"disabled": True}, key=alice["key"]
    )
    assert got == 403
    assert (await api.call("DELETE", f"/admin/keys/{alice['id']}"))[0] == 200
    got, answer = await api.call("PATCH", f"/admin/keys/{alice['id']}", {"disabled": False})
    assert got == 404 and answer["code"] == "key_not_found"
