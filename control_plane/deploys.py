"""Deploying a handler project: check and store a version, then move it to "available".

`stage` reads `PUT /apis/{name}`'s tar.gz into `incoming/`, unpacks it safely, links its weight
blobs and checks its spec and requirements: everything that can be refused is refused here,
before a row or a version folder exists. `store` makes the version (the API's row, its folder
under `versions/`) and `advance` runs in the background: the environment is built (building),
the catalog row `owner/name` points at the version and the model job queue measures it
(benchmarking), then available, or failed with the reason. With the docker runtime, a version
with a Dockerfile has its image built while building (runtimes/docker.py: `project_image`).
A live instance of the previous version is rolled over (`_roll_over`), with the same
concurrency and expiry: the database allows one live instance per model and API version, so
the new version's starts beside it where memory allows and takes the calls once RUNNING, and
the old one drains and stops; else the old one stops first. The API's reason says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from starlette.requests import Request

from benchmarker.model_ids import is_valid_model_id
from control_plane import api_bundle as bundle
from control_plane.api_envs import EnvBuildFailed, ensure_env
from control_plane.errors import (
    ApiNameTaken,
    InvalidApiName,
    InvalidProjectSpec,
    InvalidRequirements,
    MlcpError,
    UnsupportedMediaType,
)
from control_plane.lifecycle import State
from control_plane.reconciler import GONE_REASON
from control_plane.runtimes.base import BuildsProjectImages, ProjectImageFailed
from control_plane.schemas import LoadRequest
from control_plane.state import AppState
from db import api_queries as aq
from db import queries
from db.rows import ApiRow, InstanceRow, ModelJobRow
from instance_agent.environment import Requirements, RequirementsRefused, read_requirements
from instance_agent.project import (
    RESERVED_NAMES,
    SPEC_FILE,
    InvalidSpec,
    ProjectSpec,
    check_name,
    parse_spec,
)

logger = logging.getLogger(__name__)

JOB_POLL_S = 0.5
_MEDIA_TYPES = frozenset(
    {"application/gzip", "application/x-gzip", "application/x-tar", "application/octet-stream"}
)


@dataclass(frozen=True)
class Staged:
    """A checked project unpacked under incoming/, not yet a version."""

    folder: Path
    spec: ProjectSpec
    spec_file: str
    requirements: Requirements
    content_sha256: str
    param_bytes: int | None


def check_api_name(name: str) -> str:
    try:
        return check_name(name)
    except InvalidSpec as exc:
        raise InvalidApiName(exc.message) from exc


def model_of(owner: str, name: str) -> str:
    """The catalog model of an API; the owner (the key's name) must be usable in a model id."""
    model = f"{owner}/{name}"
    if owner in RESERVED_NAMES or not is_valid_model_id(model):
        raise InvalidApiName(
            f"this key's name {owner[:100]!r} cannot own an API: it must be a valid model id "
            "part (letters, digits, '.', '_', '-') and not a route's name"
        )
    return model


def _spec_text(project: Path, spec_name: str | None) -> tuple[str, str]:
    if spec_name is not None:
        if "/" in spec_name or not spec_name.endswith((".yaml", ".yml")) or spec_name[0] == ".":
            raise InvalidProjectSpec("'spec' must name a .yaml file at the project's root")
        candidates = [project / spec_name]
    elif (project / SPEC_FILE).is_file():
        candidates = [project / SPEC_FILE]
    else:
        candidates = sorted(project.glob("*.yaml")) + sorted(project.glob("*.yml"))
    if len(candidates) != 1 or not candidates[0].is_file():
        raise InvalidProjectSpec(
            f"the project has no {SPEC_FILE} (nor exactly one other .yaml spec at its root; "
            "name it with ?spec=FILE)"
        )
    try:
        return candidates[0].name, candidates[0].read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidProjectSpec(f"{candidates[0].name} is not UTF-8 text") from exc


def check_project(project: Path, name: str, spec_name: str | None) -> tuple[str, ProjectSpec]:
    """The project's spec file and spec, checked against its files; mlcp.yaml written from it."""
    spec_file, text = _spec_text(project, spec_name)
    try:
        spec = parse_spec(text)
    except InvalidSpec as exc:
        raise InvalidProjectSpec(f"{spec_file}: {exc.message}") from exc
    if spec.name != name:
        raise InvalidProjectSpec(
            f"{spec_file} names the API {spec.name!r}, but it is deployed as {name!r}"
        )
    root = project.resolve()
    for label, rel in (("handler.path", spec.handler_path), ("protobuf_path", spec.protobuf_path)):
        if rel is None:
            continue
        path = project / rel
        if not path.is_file() or not path.resolve().is_relative_to(root):
            raise InvalidProjectSpec(f"{spec_file}: {label} {rel!r} is not a file of the project")
    if spec_file != SPEC_FILE:
        # The agent and the catalog read mlcp.yaml first: the spec deployed is the one named.
        (project / SPEC_FILE).write_text(text, "utf-8")
    return spec_file, spec


def _unpack_and_check(
    root: Path, archive: Path, folder: Path, cap: int, name: str, spec_name: str | None
) -> tuple[str, ProjectSpec, Requirements, int | None]:
    bundle.unpack(archive, folder, cap)
    bundle.link_weights(root, folder, bundle.read_manifest(folder))
    spec_file, spec = check_project(folder, name, spec_name)
    try:
        requirements = read_requirements(folder)
    except RequirementsRefused as exc:
        raise InvalidRequirements(str(exc)) from exc
    return spec_file, spec, requirements, bundle.weights_bytes(folder)


async def stage(state: AppState, request: Request, name: str, spec_name: str | None) -> Staged:
    """Receive, unpack and check `PUT /apis/{name}`'s body; nothing is left on refusal."""
    media = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if media and media not in _MEDIA_TYPES:
        raise UnsupportedMediaType("send the project as a tar.gz (Content-Type: application/gzip)")
    cap = state.settings.max_project_bytes
    bundle.check_declared_length(request.headers.get("content-length"), cap, "a project")
    root = bundle.apis_root(state.settings.data_dir)
    work = bundle.incoming(root)
    archive = work.with_suffix(".tar.gz")
    try:
        received = await bundle.receive(request.stream(), archive, cap, "a project")
        spec_file, spec, requirements, weights = await anyio.to_thread.run_sync(
            _unpack_and_check, root, archive, work, cap, name, spec_name
        )
    except BaseException:
        await anyio.to_thread.run_sync(bundle.remove, work)
        raise
    finally:
        await anyio.to_thread.run_sync(bundle.remove, archive)
    return Staged(work, spec, spec_file, requirements, received.sha256, weights)


async def store(state: AppState, owner: str, staged: Staged) -> ApiRow:
    """Make the staged project the API's new current version (status building)."""
    model = model_of(owner, staged.spec.name)
    root = bundle.apis_root(state.settings.data_dir)
    try:
        existing = await queries.get_model(state.pool, model)
        if existing is not None and existing.present and existing.source_kind != "apis":
            raise ApiNameTaken(
                f"the catalog already has a model {model} (from {existing.source_kind}); "
                "deploy under another name"
            )
        async with state.pool.acquire() as conn, conn.transaction():
            row = await aq.begin_api_version(
                conn, owner, staged.spec.name, model, staged.spec.public
            )
            folder = bundle.version_dir(root, owner, row.name, row.version)
            await aq.insert_api_version(
                conn,
                owner,
                row.name,
                row.version,
                staged.content_sha256,
                str(folder),
                staged.spec_file,
                staged.requirements.sha256,
            )
            # A folder left by a version whose row was never committed is not anyone's.
            await anyio.to_thread.run_sync(bundle.remove, folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            await anyio.to_thread.run_sync(os.replace, staged.folder, folder)
        state.api_cache.pop((owner, row.name), None)
    except BaseException:
        await anyio.to_thread.run_sync(bundle.remove, staged.folder)
        raise
    return row


class Deploys:
    """The background `advance` tasks of this control plane, cancelled when it stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, state: AppState, row: ApiRow) -> None:
        task = asyncio.create_task(advance(state, row), name=f"mlcp-deploy-{row.model}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self) -> None:
        """Until every deploy under way has finished (tests, benchmarks)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _set(state: AppState, row: ApiRow, status: str, reason: str | None) -> ApiRow | None:
    moved = await aq.set_api_status(state.pool, row.owner, row.name, row.version, status, reason)
    state.api_cache.pop((row.owner, row.name), None)
    return moved


async def advance(state: AppState, row: ApiRow) -> None:
    """building → benchmarking → available (rolling a live instance over), or failed."""
    try:
        await _advance(state, row)
    except asyncio.CancelledError:
        raise
    except MlcpError as exc:
        with contextlib.suppress(Exception):
            await _set(state, row, "failed", exc.message)
    except Exception:
        logger.exception("deploying %s version %d failed", row.model, row.version)
        with contextlib.suppress(Exception):
            await _set(state, row, "failed", "deploy failed unexpectedly (see the server log)")


async def resume(state: AppState) -> int:
    """Take up the deploys a stopped control plane left under way; how many."""
    rows = [
        r for r in await aq.list_apis(state.pool, None) if r.status in ("building", "benchmarking")
    ]
    for row in rows:
        state.deploys.start(state, row)
    return len(rows)


async def _advance(state: AppState, row: ApiRow) -> None:
    root = bundle.apis_root(state.settings.data_dir)
    folder = bundle.version_dir(root, row.owner, row.name, row.version)
    if row.status == "benchmarking":
        # Resumed after a restart: the catalog row is this version's; follow or queue its job.
        live = await queries.latest_model_job(state.pool, row.model, ["queued", "benchmarking"])
        model = await queries.get_model(state.pool, row.model)
        if live is None and model is not None and model.required_ram_bytes is not None:
            await _available(state, row)  # a rollover under way at the stop is finished
            return
        await _benchmark(state, row, live)
        return
    try:
        requirements = await anyio.to_thread.run_sync(read_requirements, folder)
        await ensure_env(root, requirements, folder)
        runtime = state.supervisor.runtime
        if isinstance(runtime, BuildsProjectImages) and (folder / "Dockerfile").is_file():
            await runtime.project_image(folder)  # the image its instances will run in
    except (EnvBuildFailed, RequirementsRefused, ProjectImageFailed) as exc:
        await _set(state, row, "failed", str(exc))
        return
    if await _set(state, row, "benchmarking", None) is None:
        return  # a newer version or a delete took over
    weights = await anyio.to_thread.run_sync(bundle.weights_bytes, folder)
    async with state.pool.acquire() as conn, conn.transaction():
        await queries.lock_model_requests(conn, row.model)
        await aq.upsert_api_model(conn, row.model, str(folder), weights)
    await _benchmark(state, row, None)


async def _benchmark(state: AppState, row: ApiRow, job: ModelJobRow | None) -> None:
    """Queue (unless `job` is this version's) and follow the job, then available or failed."""
    while job is None:  # a job of an earlier version may still be live: queue after it
        job = await queries.enqueue_model_job(state.pool, row.model)
        if job is None:
            await asyncio.sleep(JOB_POLL_S)
    while job.state not in ("available", "failed"):
        await asyncio.sleep(JOB_POLL_S)
        current = await aq.get_api(state.pool, row.owner, row.name)
        if current is None or current.version != row.version or current.status == "deleted":
            return
        job = await aq.get_model_job(state.pool, job.id) or job
    if job.state == "failed":
        await _set(state, row, "failed", f"benchmark failed: {job.reason or 'no reason given'}")
        return
    await _available(state, row)


async def _available(state: AppState, row: ApiRow) -> None:
    """The measured version: roll a live instance over to it, then mark it available."""
    reason = await _roll_over(state, row)
    if state.grpc is not None:
        await state.grpc.refresh()  # a project with a .proto is served over gRPC at once
    if await _set(state, row, "available", reason) is not None:
        root = bundle.apis_root(state.settings.data_dir)
        await anyio.to_thread.run_sync(prune_versions, root, row.owner, row.name, row.version)


def prune_versions(root: Path, owner: str, name: str, current: int) -> None:
    """Remove the files of versions before the previous one (no instance runs them any more;
    the previous one is kept while instances elsewhere may still be rolling over)."""
    folder = bundle.version_dir(root, owner, name, current).parent
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.name.isdigit() and int(entry.name) < current - 1:
            bundle.remove(entry)


async def collect_blobs(state: AppState, grace_s: float | None = None) -> int:
    """Remove weight blobs no version links and nobody used for `grace_s`; how many went."""
    grace = state.settings.blob_grace_s if grace_s is None else grace_s
    unused = await aq.unused_api_blobs(state.pool, grace)
    if not unused:
        return 0
    root = bundle.apis_root(state.settings.data_dir)
    gone = await anyio.to_thread.run_sync(bundle.remove_unlinked_blobs, root, unused)
    for digest in gone:
        await aq.delete_api_blob(state.pool, digest, grace)
    if gone:
        logger.info("removed %d weight blob(s) no deployed version uses", len(gone))
    return len(gone)


# How long the previous version keeps its route after the new one runs: every control plane
# refreshes its table of routes each second (scheduler.LOOPS["routes"]), so by then all of them
# send new calls to the new instance and only calls already under way reach the old one.
ROUTE_SWITCH_S = 1.5
# How long a rollover waits for the new version's instance to leave STARTING; its start has its
# own deadline (lifecycle.health_timeout_s), this only bounds a launch nobody finishes.
START_WAIT_S = 600.0
START_POLL_S = 0.2


async def _roll_over(state: AppState, row: ApiRow) -> str | None:
    """Replace the live instances of earlier versions by one of this version; what was done.

    Where memory allows, the new instance starts beside the old one, which serves every call
    until the new one is RUNNING; then the routes switch and the old one drains its calls and
    stops. Otherwise the old one stops first and the new one starts in its place. Run again on
    a resumed deploy, it finishes what a control plane killed midway left: a new instance
    already started is waited for (started again once if its launch was lost), then the old
    ones stop.
    """
    for attempt in range(2):
        live = await queries.live_instances_for_model(state.pool, row.model)
        serving = [i for i in live if i.state in (State.STARTING, State.RUNNING)]
        old = [i for i in serving if i.api_version != row.version]
        new = next((i for i in serving if i.api_version == row.version), None)
        if not old:
            return None if new is None else _rolled(row, None)
        template = old[-1]
        if new is None:
            from control_plane.loading import load_beside  # loading imports the supervisor's world

            await _set(
                state,
                row,
                "benchmarking",
                f"rolling over: version {row.version}'s instance is starting beside the "
                "previous one, which serves calls meanwhile",
            )
            request = LoadRequest(row.model, template.concurrency, template.expiration_s)
            try:
                new = await load_beside(state, request, template.owner_key_id)
            except MlcpError as exc:
                return (
                    f"version {row.version} is available, but its instance could not start "
                    f"beside the previous one ({exc.message}); the previous one keeps serving"
                )
            if new is None:
                return await _stop_then_start(state, row, template, old)
        started = await _wait_started(state, new.id)
        if started is not None and started.state == State.RUNNING:
            await state.supervisor.refresh_routes()
            await asyncio.sleep(ROUTE_SWITCH_S)
            for previous in old:
                await state.supervisor.stop(
                    previous, f"replaced by version {row.version}", drain=True
                )
            return _rolled(row, template)
        why = "it did not start" if started is None else (started.reason or started.state)
        if attempt == 0 and started is not None and started.reason == GONE_REASON:
            continue  # its launcher died with a control plane before it ran: start it again
        return (
            f"version {row.version} is available, but its instance failed to start ({why}); "
            "the previous version's instance keeps serving"
        )
    return None


def _rolled(row: ApiRow, previous: InstanceRow | None) -> str:
    was = (
        "the previous one"
        if previous is None or previous.api_version is None
        else f"version {previous.api_version}'s"
    )
    return (
        f"rolled over to version {row.version}: its instance started beside {was}, took the "
        "calls once RUNNING, then the previous one drained its calls and stopped"
    )


async def _wait_started(state: AppState, instance_id: int) -> InstanceRow | None:
    """The instance once it left STARTING (None if it never did within START_WAIT_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_WAIT_S
    while loop.time() < deadline:
        current = await queries.get_instance(state.pool, instance_id)
        if current is None or current.state != State.STARTING:
            return current
        await asyncio.sleep(START_POLL_S)
    return None


async def _stop_then_start(
    state: AppState, row: ApiRow, template: InstanceRow, old: list[InstanceRow]
) -> str:
    """Not enough memory for both at once: stop the old instance, then start this version's."""
    sup = state.supervisor
    for previous in old:
        await sup.stop(previous, f"replaced by version {row.version}", drain=True)
    from control_plane.loading import load  # loading imports the supervisor's world

    try:
        await load(
            state,
            LoadRequest(row.model, template.concurrency, template.expiration_s),
            template.owner_key_id,
        )
    except MlcpError as exc:
        # The version itself is fine (it was just measured): it loads on its next call.
        return (
            f"version {row.version} is available; there was not memory enough to start it "
            "beside the previous instance, so that one was stopped, but starting this "
            f"version's failed: {exc.message}"
        )
    return (
        f"rolled over to version {row.version}: there was not memory enough for both at once, "
        "so the previous instance was stopped, then this version's started"
    )
