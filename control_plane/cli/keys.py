"""Key commands over HTTP (admin key): keys create/list/disable/enable/expire/revoke."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from control_plane.cli import output
from control_plane.cli.config import Target

JsonFlag = Annotated[bool, typer.Option("--json", help="print the server's JSON for scripts")]
KeyId = Annotated[int, typer.Argument(help="the key's id (from `mlcp keys list`)", min=1)]

keys_app = typer.Typer(help="manage API keys on the server (needs an admin key)")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


def _target(ctx: typer.Context) -> Target:
    target: Target = ctx.obj
    return target


def _print_keys(rows: list[dict[str, Any]]) -> None:
    output.table(
        ["ID", "NAME", "SCOPE", "PREFIX", "CREATED", "STATE", "EXPIRES"],
        [
            (
                r.get("id"),
                r.get("name"),
                r.get("scope"),
                r.get("prefix"),
                r.get("created"),
                "revoked" if r.get("revoked") else "disabled" if r.get("disabled") else "active",
                r.get("expiresAt") or "-",
            )
            for r in rows
        ],
    )


@keys_app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="who the key is for")],
    scope: Annotated[str, typer.Option("--scope", help="user or admin")] = "user",
    as_json: JsonFlag = False,
) -> None:
    """Create a key; its secret is printed this once."""
    body: dict[str, Any] = {"name": name, "scope": scope}
    answer = _target(ctx).client().call("POST", "/admin/keys", body)
    if as_json:
        output.print_json(answer)
        return
    _print_keys([answer])
    output.out.print(f"\nkey (shown once): {answer.get('key')}", markup=False)


@keys_app.command("list")
def list_keys(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Every key, without secrets."""
    rows = _target(ctx).client().call("GET", "/admin/keys")
    if as_json:
        output.print_json(rows)
        return
    _print_keys(rows)


@keys_app.command("revoke")
def revoke(ctx: typer.Context, key_id: KeyId, as_json: JsonFlag = False) -> None:
    """Revoke a key for good."""
    answer = _target(ctx).client().call("DELETE", f"/admin/keys/{key_id}")
    if as_json:
        output.print_json(answer)
        return
    _print_keys([answer])


def _update(ctx: typer.Context, key_id: int, body: dict[str, Any], as_json: bool) -> None:
    answer = _target(ctx).client().call("PATCH", f"/admin/keys/{key_id}", body)
    if as_json:
        output.print_json(answer)
        return
    _print_keys([answer])


@keys_app.command("disable")
def disable(ctx: typer.Context, key_id: KeyId, as_json: JsonFlag = False) -> None:
    """Disable a key (it stops working until enabled again)."""
    _update(ctx, key_id, {"disabled": True}, as_json)


@keys_app.command("enable")
def enable(ctx: typer.Context, key_id: KeyId, as_json: JsonFlag = False) -> None:
    """Enable a disabled key."""
    _update(ctx, key_id, {"disabled": False}, as_json)


@keys_app.command("expire")
def expire(
    ctx: typer.Context,
    key_id: KeyId,
    at: Annotated[
        str, typer.Argument(help="an ISO-8601 time such as 2030-01-31T00:00:00Z, or 'never'")
    ],
    as_json: JsonFlag = False,
) -> None:
    """Set when a key stops working, or 'never'."""
    _update(ctx, key_id, {"expiresAt": None if at == "never" else at}, as_json)
