"""The one load path: every route that starts a model, or waits for one, goes through here.

`load` is what `/model/load` does, what a pending `"benchmark": true` load does once its model is
measured, and what routes that load on demand do: flush this node's activity (idleness must be
judged on current counts), plan and reserve memory (admission.py), then launch the instance or
retune the live one. `route_to` finds where a model is served, waiting for one that is starting
and, for routes that load on demand, loading it first.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from benchmarker.model_store import engine_for
from control_plane.admission import Admission, admit, plan_body
from control_plane.cluster import admission_devices
from control_plane.device_kind import AUTO, CPU
from control_plane.errors import (
    BenchmarkFailed,
    EngineInUse,
    EngineUnavailable,
    InstanceLimit,
    InstanceStopping,
    Loading,
    ModelNotFound,
    NotBenchmarked,
    NotLoaded,
    StateChanging,
    UnsupportedTask,
)
from control_plane.jobs import request_model_job
from control_plane.lifecycle import State
from control_plane.limits import rate_headers
from control_plane.placement import NotMeasured, Place, QueueBenchmark, Retune, Stopping
from control_plane.schemas import LoadRequest
from control_plane.state import AppState
from control_plane.supervisor import Route
from db import queries
from db.rows import InstanceRow, ModelRow
from instance_agent.engines import EngineUnavailable as EngineNotInstalled

# Tasks an instance agent can serve.
RUNNABLE_TASKS = frozenset(
    {"text-generation", "feature-extraction", "handler", "automatic-speech-recognition"}
)
# A request for a STARTING model waits this long by default for it to become RUNNING.
DEFAULT_COLD_WAIT_S = 5.0
MAX_COLD_WAIT_S = 120
# An instance limit lasts until the key deletes an instance or one expires: a retry hint only.
INSTANCE_LIMIT_RETRY_S = 30


@dataclass(frozen=True)
class LoadOutcome:
    """What a load did: started a new instance, retuned the live one, queued, or only planned."""

    kind: Literal["started", "updated", "queued", "planned"]
    row: InstanceRow | None = None
    plan: dict[str, Any] | None = None


def check_runnable(model: ModelRow | None, name: str) -> ModelRow:
    """The catalog row of a model that can be loaded, or the error saying why not."""
    if model is None or not model.present:
        raise ModelNotFound(f"model {name} is not in the catalog")
    if model.task not in RUNNABLE_TASKS:
        raise UnsupportedTask(
            f"model {name} is a {model.task} model; "
            f"only {', '.join(sorted(RUNNABLE_TASKS))} models can be loaded"
        )
    return model


async def load(
    state: AppState,
    request: LoadRequest,
    owner: int | None,
    now: datetime | None = None,
    *,
    may_retune_others: bool = True,
    max_instances: int = 0,
) -> LoadOutcome:
    """Load `request.model`, or retune its live instance; see the module docstring.

    With `may_retune_others` False (a user key), a live instance another key loaded is shared:
    asking for its current settings answers it as it is, asking for others is 404 not_loaded
    (only its owner or an admin may retune it). Checked before admission, so a refused retune
    never evicts anything. With `max_instances` (the key's limit, 0: none), a key that owns that
    many live instances may not start another (429 instance_limit).
    """
    model = check_runnable(await queries.get_model(state.pool, request.model), request.model)
    if max_instances and owner is not None and not request.dry_run:
        await _check_instance_limit(state, request.model, owner, max_instances)
    engine = await _engine(state, model, request)
    if not may_retune_others and not request.dry_run:
        current = await queries.latest_instance_for_model(state.pool, request.model)
        if (
            current is not None
            and current.state in (State.STARTING, State.RUNNING)
            and current.owner_key_id != owner
        ):
            if (current.concurrency, current.expiration_s) == (
                request.concurrency,
                request.expiration_s,
            ):
                return LoadOutcome("updated", current)
            raise NotLoaded(
                f"model {request.model} has no instance loaded by this key; the shared instance "
                "may be run, but only the key that loaded it (or an admin) may change it"
            )
    sup = state.supervisor
    admission = await _admit(
        state,
        model,
        request,
        owner,
        engine,
        now,
        dry_run=request.dry_run,
        benchmark=request.benchmark,
        device=request.device,
    )
    plan = admission.plan
    if isinstance(plan, NotMeasured | QueueBenchmark) and admission.kind != CPU:
        raise NotBenchmarked(
            f"model {model.name} has not been measured on a GPU; benchmark it there with "
            "`python -m benchmarker worker --device cuda`, or load it on the host with "
            '"device": "cpu"'
        )
    if isinstance(plan, NotMeasured):
        raise NotBenchmarked(
            f"model {model.name} has not been benchmarked; request it first with "
            'POST /model/job, or load with "benchmark": true'
        )
    if request.dry_run:
        return LoadOutcome("planned", plan=plan_body(model.name, request.concurrency, admission))
    if isinstance(plan, Stopping):
        raise InstanceStopping(f"the instance of {model.name} is stopping; load it again shortly")
    if isinstance(plan, QueueBenchmark):
        return await _queue(state, model, request, owner)
    if isinstance(plan, Retune):
        return await _retune(state, request, admission)
    assert isinstance(plan, Place) and admission.row is not None
    sup.launch(admission.row, model, admission.evicted)
    return LoadOutcome("started", admission.row)


async def load_beside(
    state: AppState, request: LoadRequest, owner: int | None
) -> InstanceRow | None:
    """Start a second instance of `request.model` beside its live one (a redeployed API rolling
    over to its new version), where it fits without evicting anything; None where it does not.

    The model's catalog row already names the new version's files, so that is what it runs.
    """
    model = check_runnable(await queries.get_model(state.pool, request.model), request.model)
    try:
        engine = engine_for(model, None)
    except EngineNotInstalled as exc:
        raise EngineUnavailable(str(exc)) from exc
    admission = await _admit(state, model, request, owner, engine, beside=True)
    if isinstance(admission.plan, NotMeasured | QueueBenchmark):
        raise NotBenchmarked(f"model {model.name} has not been benchmarked")
    if admission.row is None:
        return None
    state.supervisor.launch(admission.row, model)
    return admission.row


async def _admit(
    state: AppState,
    model: ModelRow,
    request: LoadRequest,
    owner: int | None,
    engine: str | None,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    benchmark: bool = False,
    device: str = AUTO,
    beside: bool = False,
) -> Admission:
    """Admission for `request` (admission.py), with what every load must give it first."""
    # This node's in-flight counts must be in the database before idleness is judged.
    await state.activity.flush(state.pool)
    return await admit(
        state.pool,
        state.settings,
        state.supervisor.runtime.name,
        model,
        request.concurrency,
        request.expiration_s,
        owner,
        # Reservations' idleness is judged by the clock their times were written by.
        now or await queries.database_now(state.pool),
        devices=await admission_devices(state),
        engine=engine,
        dry_run=dry_run,
        benchmark=benchmark,
        device=device,
        beside=beside,
    )


async def _check_instance_limit(state: AppState, model: str, owner: int, most: int) -> None:
    # Loading a model that has a live instance starts none (a retune, or the shared instance).
    # Two loads by one key at once on two control planes may both pass: a bound of one extra.
    current = await queries.latest_instance_for_model(state.pool, model)
    if current is not None and current.state in (State.STARTING, State.RUNNING):
        return
    if await queries.count_owned_instances(state.pool, owner, model) >= most:
        raise InstanceLimit(
            f"this key may have {most:,} instances loaded at once; delete one first "
            "(POST /model/delete)",
            retry_after_s=INSTANCE_LIMIT_RETRY_S,
            rate_limit=rate_headers(most, 0, INSTANCE_LIMIT_RETRY_S),
        )


async def _engine(state: AppState, model: ModelRow, request: LoadRequest) -> str | None:
    """The engine a new instance would run; a live one running another refuses the request."""
    try:
        engine = engine_for(model, request.engine)
    except EngineNotInstalled as exc:
        raise EngineUnavailable(str(exc)) from exc
    if request.engine is not None:
        live = await queries.latest_instance_for_model(state.pool, model.name)
        if (
            live is not None
            and live.state in (State.STARTING, State.RUNNING)
            and live.engine is not None
            and live.engine != engine
        ):
            raise EngineInUse(
                f"model {model.name} is served by {live.engine}; unload it (POST /model/delete) "
                f"before loading it with {engine}"
            )
    return engine


async def _retune(state: AppState, request: LoadRequest, admission: Admission) -> LoadOutcome:
    sup = state.supervisor
    # Memory taken from evicted instances is free only once they are gone; then the batch grows.
    await asyncio.gather(*(sup.finish_stopping(v) for v in admission.evicted))
    live = await sup.update_live(request.model, request.concurrency, request.expiration_s)
    if live is None:
        raise StateChanging(f"the instance of {request.model} is changing state; retry")
    return LoadOutcome("updated", live)


async def _queue(
    state: AppState, model: ModelRow, request: LoadRequest, owner: int | None
) -> LoadOutcome:
    """Request the model's benchmark and remember to load it once it is measured."""
    job = await request_model_job(state.pool, state.settings, model.name, datetime.now(UTC))
    if not job["success"]:
        raise BenchmarkFailed(f"model {model.name} cannot be benchmarked: {job['message']}")
    await queries.upsert_pending_load(
        state.pool, model.name, request.concurrency, request.expiration_s, owner, request.engine
    )
    return LoadOutcome("queued")


def cold_wait_s(prefer: str | None, default_s: float = DEFAULT_COLD_WAIT_S) -> float:
    """How long a request may wait for a STARTING model: `Prefer: wait=N` (RFC 7240), capped."""
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        value = value.strip()
        if name.strip().lower() == "wait" and value.isascii() and value.isdigit():
            # Compared as text first: int() of thousands of digits is refused by Python.
            return float(MAX_COLD_WAIT_S if len(value) > 3 else min(int(value), MAX_COLD_WAIT_S))
    return default_s


@dataclass(frozen=True)
class OnDemand:
    """Settings for routes that load a model when a request names one that is not loaded."""

    owner: int | None
    concurrency: int
    expiration_s: int
    # The owner's maxInstances (0: none).
    max_instances: int = 0


async def route_to(
    state: AppState, model: str, wait_s: float, on_demand: OnDemand | None = None
) -> Route:
    """Where `model` is served now, waiting up to `wait_s` for a STARTING instance.

    Without `on_demand`, a model with no live instance is an error (`/model/run`: load it
    first); with it, the model is loaded through `load` and every concurrent request waits on
    that one load.
    """
    sup = state.supervisor
    route = sup.route(model)
    if route is not None:
        return route
    # Maybe started by another control plane since the last refresh.
    await sup.refresh_routes()
    route = sup.route(model)
    if route is not None:
        return route
    row = await queries.latest_instance_for_model(state.pool, model)
    if row is None or row.state in (State.STOPPED, State.FAILED):
        if on_demand is None:
            check_runnable(await queries.get_model(state.pool, model), model)
            raise NotLoaded(_not_loaded_message(model, row))
        try:
            await load(
                state,
                LoadRequest(model, on_demand.concurrency, on_demand.expiration_s),
                on_demand.owner,
                max_instances=on_demand.max_instances,
            )
        except InstanceStopping:
            pass  # the previous instance is going; wait below like any other request
        row = await queries.latest_instance_for_model(state.pool, model)
        if row is None:
            raise StateChanging(f"the instance of {model} is changing state; retry")
    if row.state == State.STOPPING:
        raise InstanceStopping(f"the instance of {model} is stopping; load it again shortly")
    if row.state == State.RUNNING and row.endpoint:
        return Route(row.id, row.model, row.endpoint)
    route = await sup.wait_running(model, wait_s) if wait_s > 0 else None
    if route is not None:
        return route
    latest = await queries.latest_instance_for_model(state.pool, model)
    if latest is not None and latest.state == State.FAILED:
        raise NotLoaded(_not_loaded_message(model, latest))
    raise Loading(f"model {model} is loading (STARTING); retry shortly, or send 'Prefer: wait=N'")


async def not_loaded(state: AppState, model: str) -> NotLoaded | ModelNotFound:
    """The error for a model with no instance: unknown to the catalog, or only not loaded."""
    row = await queries.get_model(state.pool, model)
    if row is None or not row.present:
        return ModelNotFound(f"model {model} is not in the catalog")
    return NotLoaded(f"model {model} is not loaded")


def _not_loaded_message(model: str, row: InstanceRow | None) -> str:
    if row is not None and row.state == State.FAILED:
        return f"model {model} is not loaded: its instance failed ({row.reason}); load it again"
    return f"model {model} is not loaded; POST /model/load first"
