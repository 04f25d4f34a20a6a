"""Model and instance commands: list, pull, load, ps, run, stop, status, logs."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.parse
from typing import Annotated, Any

import typer

from control_plane.cli import output
from control_plane.cli.client import Client, CliError
from control_plane.cli.config import Target

JsonFlag = Annotated[bool, typer.Option("--json", help="print the server's JSON for scripts")]
Model = Annotated[str, typer.Argument(help="a catalog model id, e.g. org/name")]
MESSAGE_AVAILABLE = "Model available"
PULL_POLL_S = 1.0
PULL_DEADLINE_S = 3600.0
LOGS_POLL_S = 1.0
# Each poll of `logs -f` reads this many last lines, and prints those after the previous read.
LOGS_FOLLOW_TAIL = 1000
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")


def parse_duration_s(text: str) -> int:
    """'90', '90s', '5m', '1h30m' in seconds; raises typer.BadParameter otherwise."""
    m = _DURATION.fullmatch(text.strip())
    if not text.strip() or m is None or not any(m.groups()):
        raise typer.BadParameter(f"{text!r} is not a duration like 300, 90s, 5m or 1h")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def _target(ctx: typer.Context) -> Target:
    target: Target = ctx.obj
    return target


def register(app: typer.Typer) -> None:
    app.command("list")(list_models)
    app.command("pull")(pull)
    app.command("load")(load)
    app.command("ps")(ps)
    app.command("run")(run)
    app.command("stop")(stop)
    app.command("status")(status)
    app.command("logs")(logs)


def list_models(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """The catalog: NAME, TASK, REQUIRED RAM, BENCHMARKED."""
    rows = _target(ctx).client().call("GET", "/model/list")
    if as_json:
        output.print_json(rows)
        return
    output.table(
        ["NAME", "TASK", "REQUIRED RAM", "BENCHMARKED"],
        [
            (
                r.get("name"),
                r.get("task"),
                "-" if r.get("requiredRAM") is None else f"{r['requiredRAM']} GB",
                "yes" if r.get("benchmarked") else "no",
            )
            for r in rows
        ],
    )


def pull(ctx: typer.Context, model: Model, as_json: JsonFlag = False) -> None:
    """Request the model's benchmark job and show its progress until "Model available"."""
    client = _target(ctx).client()
    started = time.monotonic()
    last: dict[str, Any] = {}
    with output.err.status(f"pulling {model}", spinner="dots") as spinner:
        while True:
            last = client.call("POST", "/model/job", {"model": model})
            message = str(last.get("message", ""))
            if not last.get("success", False):
                raise CliError(f"{model}: {message}")
            if message == MESSAGE_AVAILABLE:
                break
            elapsed = time.monotonic() - started
            if elapsed > PULL_DEADLINE_S:
                raise CliError(f"{model}: still '{message}' after {PULL_DEADLINE_S:g} s")
            spinner.update(f"{model}: {message} ({elapsed:.0f} s)")
            time.sleep(PULL_POLL_S)
    if as_json:
        output.print_json(last)
    else:
        output.out.print(f"{model}: {MESSAGE_AVAILABLE}", markup=False)


def load(
    ctx: typer.Context,
    model: Model,
    concurrency: Annotated[int, typer.Option("-c", "--concurrency", min=1, max=64)] = 1,
    expire: Annotated[
        str | None, typer.Option("--expire", help="idle time before it stops: 300, 90s, 5m, 1h")
    ] = None,
    benchmark: Annotated[
        bool, typer.Option("--benchmark", help="benchmark it first when not yet measured")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Load the model (or retune the live instance's concurrency and expiry)."""
    body: dict[str, Any] = {"model": model, "concurrency": concurrency}
    if expire is not None:
        body["expirationPeriodSeconds"] = parse_duration_s(expire)
    if benchmark:
        body["benchmark"] = True
    answer = _target(ctx).client().call("POST", "/model/load", body)
    if as_json:
        output.print_json(answer)
        return
    state = answer.get("instanceStatus") or answer.get("status")
    output.out.print(
        f"{model}: {answer.get('status')} ({state}, concurrency {answer.get('concurrency')}, "
        f"expires after {answer.get('expirationPeriodSeconds')} s idle)",
        markup=False,
    )


def ps(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Live instances, like `ollama ps`."""
    rows = _target(ctx).client().call("GET", "/model/instances")
    if as_json:
        output.print_json(rows)
        return
    output.table(
        ["NAME", "STATUS", "CONCURRENCY", "IN FLIGHT", "MEMORY", "DEVICE", "UNTIL"],
        [
            (
                r.get("model"),
                r.get("status"),
                r.get("concurrency"),
                r.get("inFlight", 0),
                output.human_bytes(r.get("observedBytes") or r.get("reservedBytes")),
                r.get("device", "-"),
                output.until(r.get("expiresAt")),
            )
            for r in rows
        ],
    )


def run(
    ctx: typer.Context,
    model: Model,
    prompt: Annotated[str, typer.Argument(help="the prompt; '-' reads it from stdin")],
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0)] = None,
    raw: Annotated[bool, typer.Option("--raw", help="continue the text, no chat template")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="wait for the whole answer")] = (
        False
    ),
    as_json: JsonFlag = False,
) -> None:
    """Run the model and stream its answer; Ctrl-C cancels the request on the server."""
    if prompt == "-":
        prompt = sys.stdin.read()
    params: dict[str, Any] = {}
    if max_new_tokens is not None:
        params["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        params["temperature"] = temperature
    if raw:
        params["raw"] = True
    body: dict[str, Any] = {"model": model, "prompt": prompt, "params": params}
    client = _target(ctx).client()
    if no_stream or as_json:
        answer = client.call("POST", "/model/run", body, headers={"Prefer": "wait=60"})
        if as_json:
            output.print_json(answer)
        else:
            sys.stdout.write(str(answer.get("output", "")) + "\n")
        return
    body["stream"] = True
    error_line = None
    # Closing the stream closes the connection, which the server takes as a cancel.
    for text in client.stream("POST", "/model/run", body, headers={"Prefer": "wait=60"}):
        if "\n[error: " in text:
            text, _, error_line = text.partition("\n[error: ")
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if error_line is not None:
        raise CliError("[error: " + error_line.strip())


def stop(ctx: typer.Context, model: Model, as_json: JsonFlag = False) -> None:
    """Stop the model's instance."""
    answer = _target(ctx).client().call("POST", "/model/delete", {"model": model})
    if as_json:
        output.print_json(answer)
        return
    output.out.print(f"{model}: {answer.get('status')}", markup=False)


def status(ctx: typer.Context, model: Model, as_json: JsonFlag = False) -> None:
    """The model's latest instance: its state, why, and its history."""
    answer = _target(ctx).client().call("POST", "/model/status", {"model": model})
    if as_json:
        output.print_json(answer)
        return
    fields = [
        ("model", answer.get("model")),
        ("status", answer.get("status")),
        ("reason", answer.get("reason") or "-"),
        ("concurrency", answer.get("concurrency")),
        ("in flight", answer.get("inFlight", 0)),
        ("inferences", answer.get("inferences")),
        ("device", answer.get("device", "-")),
        ("memory", output.human_bytes(answer.get("observedBytes"))),
        ("reserved", output.human_bytes(answer.get("reservedBytes"))),
        ("expires", output.until(answer.get("expiresAt"))),
    ]
    output.table(["FIELD", "VALUE"], fields)
    history = answer.get("history") or []
    if history:
        output.out.print()
        output.table(
            ["AT", "FROM", "TO", "REASON"],
            [
                (h.get("at"), h.get("from") or "-", h.get("to"), h.get("reason") or "")
                for h in history
            ],
        )


def model_of(client: Client, name: str) -> str:
    """A catalog model id as given; a name without '/' is the caller's API: its model."""
    if "/" in name:
        return name
    api = client.call("GET", "/apis/" + urllib.parse.quote(name, safe=""))
    model = api.get("model") if isinstance(api, dict) else None
    if not isinstance(model, str):
        raise CliError(f"{client.url} did not say which model API {name} is")
    return model


def new_lines(before: list[str], now: list[str]) -> list[str]:
    """The lines of `now` after its longest overlap with the end of `before` (two log tails)."""
    for k in range(min(len(before), len(now)), 0, -1):
        if before[-k:] == now[:k]:
            return now[k:]
    return now


def _tail(client: Client, model: str, tail: int) -> str:
    text = client.call("GET", "/model/logs", query={"model": model, "tail": str(tail)})
    return text if isinstance(text, str) else json.dumps(text)


def logs(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Argument(help="a catalog model id (org/name) or the name of one of your APIs")
    ],
    tail: Annotated[int, typer.Option("--tail", "-n", min=1, max=5000)] = 200,
    follow: Annotated[
        bool, typer.Option("-f", "--follow", help="keep printing new lines (Ctrl-C to stop)")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """The last log lines of the model's (or API's) instance (its owner or an admin)."""
    client = _target(ctx).client()
    model = model_of(client, model)
    if not follow:
        text = _tail(client, model, tail)
        if as_json:
            output.print_json({"model": model, "lines": text.splitlines()})
            return
        sys.stdout.write(text)
        return
    seen: list[str] = []
    while True:
        try:
            lines = _tail(client, model, LOGS_FOLLOW_TAIL).splitlines()
        except CliError as exc:
            if exc.code != "not_loaded":
                raise
            lines = []  # no instance yet (or it stopped): wait for the next one
        fresh = new_lines(seen, lines) if seen else lines[-tail:]
        for line in fresh:
            if as_json:
                output.out.print(json.dumps({"model": model, "line": line}), markup=False)
            else:
                sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if lines:
            seen = lines
        time.sleep(LOGS_POLL_S)
