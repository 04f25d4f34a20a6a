"""Your own code as an API: `mlcp init`, `get [NAME] [--watch]`, `delete NAME` (deploy: deploy.py).

An API belongs to the key's owner and is named without a slash (`sentiment-analyser`); its
catalog model is `owner/name`. An admin may name another owner's API as `owner/name`.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from control_plane.cli import output, scaffold
from control_plane.cli.client import Client, CliError
from control_plane.cli.config import Target

JsonFlag = Annotated[bool, typer.Option("--json", help="print the server's JSON for scripts")]
WATCH_INTERVAL_S = 1.0
COLUMNS = ("NAME", "STATUS", "VERSION", "INSTANCE", "UNTIL")


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("get")(get)
    app.command("delete")(delete)


def _target(ctx: typer.Context) -> Target:
    target: Target = ctx.obj
    return target


def api_path(name: str) -> str:
    """`/apis/{name}` for the caller's API, `/apis/{owner}/{name}` for an admin's `owner/name`."""
    parts = name.split("/")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise CliError(f"{name!r} is not an API name (NAME, or OWNER/NAME for an admin)")
    return "/apis/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


def fetch_api(client: Client, name: str) -> dict[str, Any]:
    """The API's state from `GET /apis/{name}`."""
    answer = client.call("GET", api_path(name))
    if not isinstance(answer, dict):
        raise CliError(f"{client.url} sent an answer that is not an API's state")
    return answer


def row(api: dict[str, Any]) -> tuple[object, ...]:
    """One line of `mlcp get`: NAME, STATUS, VERSION, INSTANCE, UNTIL."""
    instance = api.get("instance") or {}
    return (
        api.get("name"),
        api.get("status"),
        api.get("version"),
        instance.get("status") or "-",
        output.until(instance.get("expiresAt")) if instance else "-",
    )


def render(apis: list[dict[str, Any]]) -> Table:
    """The table `mlcp get` prints (and `--watch` refreshes)."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for api in apis:
        table.add_row(*("" if v is None else str(v) for v in row(api)))
    return table


def init(
    name: Annotated[str, typer.Argument(help="the API's name: lowercase letters, digits, '-'")],
    template: Annotated[
        str, typer.Option("--template", "-t", help="cellstrat (src/main.py) or cortex (handler.py)")
    ] = "cellstrat",
    directory: Annotated[
        Path | None, typer.Option("--dir", help="where to write it (default: ./NAME)")
    ] = None,
) -> None:
    """Scaffold a handler project that deploys and answers on the first try."""
    dest = directory if directory is not None else Path(name)
    written = scaffold.write_project(dest, name, template)
    output.out.print(f"created {dest}/ ({template} layout):", markup=False)
    for rel in written:
        output.out.print(f"  {rel}", markup=False)
    spec = "" if template == "cellstrat" else f" {scaffold.cortex_spec_file(name)}"
    output.out.print(f"next: cd {dest} && mlcp deploy{spec}", markup=False)


def _listing(client: Client, name: str | None) -> list[dict[str, Any]]:
    if name is not None:
        return [fetch_api(client, name)]
    answer = client.call("GET", "/apis")
    if not isinstance(answer, list):
        raise CliError(f"{client.url} sent an answer that is not a list of APIs")
    return [a for a in answer if isinstance(a, dict)]


def get(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="one API (default: all of yours)")] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="refresh every second until Ctrl-C")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Your APIs: NAME, STATUS, VERSION, INSTANCE, UNTIL (with --json: one line per change)."""
    client = _target(ctx).client()
    apis = _listing(client, name)
    if watch and as_json:
        last = None
        while True:
            text = json.dumps(apis if name is None else apis[0])
            if text != last:
                output.out.print(text, markup=False)
                last = text
            time.sleep(WATCH_INTERVAL_S)
            apis = _listing(client, name)
    if watch:
        with Live(render(apis), console=output.out, auto_refresh=False) as live:
            while True:
                time.sleep(WATCH_INTERVAL_S)
                live.update(render(_listing(client, name)), refresh=True)
    if as_json:
        output.print_json(apis if name is None else apis[0])
        return
    output.out.print(render(apis), markup=False)
    for api in apis:
        if api.get("reason"):
            output.out.print(f"{api.get('name')}: {api['reason']}", markup=False)


def delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="your API's name")],
    as_json: JsonFlag = False,
) -> None:
    """Delete the API: its instance stops and its routes answer 404."""
    answer = _target(ctx).client().call("DELETE", api_path(name))
    if as_json:
        output.print_json(answer)
        return
    status = answer.get("status") if isinstance(answer, dict) else answer
    output.out.print(f"{name}: {status}", markup=False)
