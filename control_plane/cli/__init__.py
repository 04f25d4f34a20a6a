"""The `mlcp` command line: one module per command group, over HTTP to `MLCP_URL` with `MLCP_KEY`.

Exit codes: 0 ok, 1 error (the server's message, or why it could not be reached, on one line),
2 usage, 130 interrupted. Adding a group: a module with `register(app)`, listed in `GROUPS`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from control_plane.cli import admin, apis, deploy, events, keys, models, output
from control_plane.cli.client import CliError
from control_plane.cli.config import Target

app = typer.Typer(
    name="mlcp",
    help="Operate an mlcp control plane. Without a command: serve the API.",
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
)

GROUPS = (models, events, keys, admin, apis, deploy)
for group in GROUPS:
    group.register(app)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    url: Annotated[
        str | None, typer.Option("--url", envvar="MLCP_URL", help="the control plane's URL")
    ] = None,
    key: Annotated[
        str | None,
        typer.Option("--key", envvar="MLCP_KEY", help="the API key", show_default=False),
    ] = None,
) -> None:
    ctx.obj = Target(url, key)
    if ctx.invoked_subcommand is None:
        admin.serve()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (never a traceback for an expected failure)."""
    try:
        # Inside the try: a Ctrl-C while typer builds the command exits 130 too.
        command = typer.main.get_command(app)
        result = command.main(args=argv, prog_name="mlcp", standalone_mode=False)
    except typer.Abort:
        return 130
    except typer.TyperException as exc:
        # Usage errors (exit code 2): a bad option, a missing argument, a value out of range.
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            output.error(str(exc))
        return int(getattr(exc, "exit_code", 2))
    except CliError as exc:
        output.error(exc.message)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return result if isinstance(result, int) else 0
