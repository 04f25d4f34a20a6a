"""`mlcp events`: lifecycle events (jobs, instances, evictions) from `GET /events`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from control_plane.cli import output
from control_plane.cli.client import sse_events
from control_plane.cli.config import Target


def register(app: typer.Typer) -> None:
    app.command("events")(events)


def _line(event: dict[str, Any]) -> str:
    change = f"{event.get('from') or '-'} -> {event.get('to')}"
    reason = f"  ({event['reason']})" if event.get("reason") else ""
    return f"{event.get('at')}  {event.get('kind'):<8} {event.get('model')}  {change}{reason}"


def events(
    ctx: typer.Context,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new events")] = (
        False
    ),
    tail: Annotated[int, typer.Option("--tail", "-n", min=0, max=1000)] = 20,
    since: Annotated[
        int | None, typer.Option("--since", min=0, help="replay every event after this id")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """The last events, or with -f every new one as it happens (Ctrl-C to stop)."""
    target: Target = ctx.obj
    query = {"tail": str(tail), "follow": "1" if follow else "0"}
    headers = {"Accept": "text/event-stream"}
    if since is not None:
        headers["Last-Event-ID"] = str(since)
    chunks = target.client().stream("GET", "/events", query=query, headers=headers)
    try:
        for sse in sse_events(chunks):
            if sse.get("event") != "lifecycle":
                continue
            event = json.loads(sse["data"])
            if as_json:
                output.out.print(json.dumps(event), markup=False)
            else:
                output.out.print(_line(event), markup=False)
    finally:
        chunks.close()  # type: ignore[attr-defined]
