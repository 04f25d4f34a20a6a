"""`mlcp deploy [PATH|SPEC.yaml]`: pack, upload what the server lacks, follow the build.

Weights go first, each blob once (`HEAD /apis/blobs/{sha256}`, then `PUT` if missing), then the
code tarball (`PUT /apis/{name}`, with `?spec=` for a spec other than mlcp.yaml), with a
progress bar in bytes. Then `GET /apis/{name}` is polled until the API is `available` (exit 0)
or `failed` (the reason printed, exit 1).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from control_plane.cli import apis, output, pack
from control_plane.cli.client import Client, CliError
from control_plane.cli.config import Target
from instance_agent.project import SPEC_FILE

POLL_S = 1.0
DEPLOY_DEADLINE_S = 3600.0
UPLOAD_CHUNK_BYTES = 1 << 20
DONE = ("available", "failed")


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)


def _chunks(f: IO[bytes], on_bytes: Callable[[int], None]) -> Iterator[bytes]:
    while chunk := f.read(UPLOAD_CHUNK_BYTES):
        on_bytes(len(chunk))
        yield chunk


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=output.err,
        transient=False,
        # Bars for people; a script's stderr gets the one-line summary and the stages only.
        disable=not output.err.is_terminal,
    )


def upload_blobs(client: Client, blobs: list[pack.Blob], bar: Progress) -> int:
    """Upload the blobs the server lacks (once per content); return how many were sent."""
    unique = {b.sha256: b for b in blobs}
    missing = [b for sha, b in unique.items() if not client.exists(f"/apis/blobs/{sha}")]
    task = bar.add_task("weights", total=sum(b.size for b in missing) or 1)
    for blob in missing:
        bar.update(task, description=f"weights {blob.rel}")
        try:
            with blob.source.open("rb") as f:
                client.upload(
                    "PUT",
                    f"/apis/blobs/{blob.sha256}",
                    _chunks(f, lambda n: bar.advance(task, n)),
                    blob.size,
                    "application/octet-stream",
                )
        except OSError as exc:
            raise CliError(f"cannot read {blob.rel}: {exc.strerror}") from None
    bar.update(task, description="weights", completed=bar.tasks[task].total)
    return len(missing)


def upload_code(
    client: Client, project: pack.Project, code: IO[bytes], size: int, bar: Progress
) -> Any:
    """`PUT /apis/{name}` with the code tarball; the server's answer (status building)."""
    task = bar.add_task("code", total=size or 1)
    query = None if project.spec_file == SPEC_FILE else {"spec": project.spec_file}
    answer = client.upload(
        "PUT",
        apis.api_path(project.spec.name),
        _chunks(code, lambda n: bar.advance(task, n)),
        size,
        "application/gzip",
        query=query,
    )
    return answer


def wait_until_done(
    client: Client, name: str, version: object, deadline_s: float
) -> dict[str, Any]:
    """Poll the API's state, showing it, until `version` is available or failed."""
    started = time.monotonic()
    last = ""
    with output.err.status(f"{name}: building", spinner="dots") as spinner:
        while True:
            api = apis.fetch_api(client, name)
            status = str(api.get("status"))
            current = api.get("version")
            behind = isinstance(version, int) and isinstance(current, int) and current < version
            if status in DONE and not behind:
                return api
            elapsed = time.monotonic() - started
            if elapsed > deadline_s:
                raise CliError(f"{name}: still {status} after {deadline_s:g} s")
            line = f"{name}: {status} (version {api.get('version')}, {elapsed:.0f} s)"
            if status != last:
                # A line per stage, also when stderr is not a terminal (the spinner then hides).
                output.err.print(f"{name}: {status}", markup=False)
                last = status
            spinner.update(line)
            time.sleep(POLL_S)


def deploy(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(help="the project folder or its spec file (default: here)")
    ] = Path("."),
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="return once uploaded, without following the build")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the API's final state")] = False,
) -> None:
    """Pack the project, upload it and follow its build and benchmark until it is available."""
    project = pack.scan(path)
    name = project.spec.name
    client = _target_client(ctx)
    weights_bytes = sum(f.size for f in project.weights)
    with _progress() as bar:
        if weights_bytes:
            task = bar.add_task("hashing", total=weights_bytes)
            blobs = pack.hash_weights(project, lambda n: bar.advance(task, n))
        else:
            blobs = []
        sent = upload_blobs(client, blobs, bar) if blobs else 0
        with tempfile.TemporaryFile(prefix="mlcp-deploy-") as code:
            pack.write_code(project, blobs, code)
            size = code.tell()
            code.seek(0)
            answer = upload_code(client, project, code, size, bar)
    reused = len({b.sha256 for b in blobs}) - sent
    version = answer.get("version") if isinstance(answer, dict) else None
    output.err.print(
        f"{name}: uploaded version {version} ({len(project.code)} code files, "
        f"{len(blobs)} weights files: {sent} sent, {reused} already stored)",
        markup=False,
    )
    if no_wait:
        if as_json:
            output.print_json(answer)
        return
    api = wait_until_done(client, name, version, DEPLOY_DEADLINE_S)
    if as_json:
        output.print_json(api)
    if api.get("status") == "failed":
        reason = str(api.get("reason") or "no reason given").strip()
        raise CliError(f"{name}: version {api.get('version')} failed: {reason}")
    if not as_json:
        owner = api.get("owner")
        output.out.print(f"{name}: available (version {api.get('version')})", markup=False)
        output.out.print(f"  POST {client.url}/{name}", markup=False)
        if owner:
            output.out.print(f"  GET|POST {client.url}/{owner}/{name}", markup=False)


def _target_client(ctx: typer.Context) -> Client:
    target: Target = ctx.obj
    return target.client()
