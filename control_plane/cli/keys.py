"""Key commands over HTTP: keys create/list/disable/enable/expire/limit/revoke (admin key), and
`usage` (any key: its own calls; an admin key: every key's)."""

from __future__ import annotations

import urllib.parse
from typing import Annotated, Any

import typer

from control_plane.cli import output
from control_plane.cli.config import Target

JsonFlag = Annotated[bool, typer.Option("--json", help="print the server's JSON for scripts")]
KeyId = Annotated[int, typer.Argument(help="the key's id (from `mlcp keys list`)", min=1)]

keys_app = typer.Typer(help="manage API keys on the server (needs an admin key)")

# A limit: a whole number, 0 for unlimited; left out, unchanged (or the server's default).
Limit = Annotated[int | None, typer.Option(min=0, show_default=False)]
# CLI flag → the API's field (docs/api.md, "Keys").
LIMIT_FLAGS = {
    "monthly-calls": "monthlyCalls",
    "rpm": "requestsPerMinute",
    "streams": "concurrentStreams",
    "max-apis": "maxApis",
    "max-instances": "maxInstances",
}


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command("usage")(usage)


def _limits(**given: int | None) -> dict[str, int]:
    return {
        LIMIT_FLAGS[flag.replace("_", "-")]: value
        for flag, value in given.items()
        if value is not None
    }


def _limit_text(value: object) -> str:
    return "-" if value in (0, None) else str(value)


def _target(ctx: typer.Context) -> Target:
    target: Target = ctx.obj
    return target


def _print_keys(rows: list[dict[str, Any]]) -> None:
    output.table(
        ["ID", "NAME", "SCOPE", "PREFIX", "CREATED", "STATE", "EXPIRES", "CALLS/MONTH", "RPM"],
        [
            (
                r.get("id"),
                r.get("name"),
                r.get("scope"),
                r.get("prefix"),
                r.get("created"),
                "revoked" if r.get("revoked") else "disabled" if r.get("disabled") else "active",
                r.get("expiresAt") or "-",
                _limit_text((r.get("effectiveLimits") or {}).get("monthlyCalls")),
                _limit_text((r.get("effectiveLimits") or {}).get("requestsPerMinute")),
            )
            for r in rows
        ],
    )


@keys_app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="who the key is for")],
    scope: Annotated[str, typer.Option("--scope", help="user or admin")] = "user",
    monthly_calls: Limit = None,
    rpm: Limit = None,
    streams: Limit = None,
    max_apis: Limit = None,
    max_instances: Limit = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a key; its secret is printed this once. Limits: 0 is unlimited, unset the default."""
    body: dict[str, Any] = {"name": name, "scope": scope}
    body.update(
        _limits(
            monthly_calls=monthly_calls,
            rpm=rpm,
            streams=streams,
            max_apis=max_apis,
            max_instances=max_instances,
        )
    )
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


@keys_app.command("limit")
def limit(
    ctx: typer.Context,
    key_id: KeyId,
    monthly_calls: Limit = None,
    rpm: Limit = None,
    streams: Limit = None,
    max_apis: Limit = None,
    max_instances: Limit = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(help="back to the server's default: monthly-calls, rpm, streams, ..."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Set a key's limits (0: unlimited); `--reset NAME` takes the server's default again."""
    body: dict[str, Any] = _limits(
        monthly_calls=monthly_calls,
        rpm=rpm,
        streams=streams,
        max_apis=max_apis,
        max_instances=max_instances,
    )
    for name in reset or []:
        if name not in LIMIT_FLAGS:
            raise typer.BadParameter(
                f"{name!r} is not a limit; one of {', '.join(LIMIT_FLAGS)}", param_hint="--reset"
            )
        body[LIMIT_FLAGS[name]] = None
    if not body:
        raise typer.BadParameter("give at least one limit, such as --monthly-calls 1000")
    _update(ctx, key_id, body, as_json)


def usage(
    ctx: typer.Context,
    month: Annotated[
        str | None, typer.Option(help="YYYY-MM; default this month (UTC)", show_default=False)
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Calls per key in a month: a user key's own, every key's with an admin key."""
    query = f"?month={urllib.parse.quote(month)}" if month is not None else ""
    answer = _target(ctx).client().call("GET", f"/usage{query}")
    if as_json:
        output.print_json(answer)
        return
    output.out.print(f"month {answer.get('month')}", markup=False)
    output.table(
        ["ID", "NAME", "SCOPE", "CALLS", "LIMIT", "REMAINING"],
        [
            (
                r.get("id"),
                r.get("name"),
                r.get("scope"),
                r.get("calls"),
                _limit_text(r.get("monthlyCalls")),
                "-" if r.get("remaining") is None else r.get("remaining"),
            )
            for r in answer.get("keys", [])
        ],
    )
