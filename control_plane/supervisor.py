"""Starts, watches and stops instances; keeps the table of where each running model listens.

Every state change goes through one conditional UPDATE (db/queries.sql), so two control planes
sharing a database never both start or both stop one instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

import aiohttp

from benchmarker.model_store import ModelStoreError, prepare_model
from control_plane import capacity
from control_plane.activity import Activity
from control_plane.device_kind import kind_of
from control_plane.device_names import HOST_DEVICE, local_of, node_of
from control_plane.errors import InstanceFailed, InstanceStopping, MlcpError
from control_plane.lifecycle import State, allowed_from, health_timeout_s
from control_plane.runtimes.base import InstanceSpec, Launched, Listed, Runtime
from control_plane.vram_recovery import FreeReader, wait_for_recovery
from db import queries
from db.pool import Pool
from db.rows import InstanceRow, ModelRow
from instance_agent.client import AgentClient, AgentNotReady, AgentUnreachable
from instance_agent.engines import parse_engine
from instance_agent.lease import DEFAULT_LEASE_GRACE_S
from instance_agent.protocol import HealthReady

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
# How long a stopping instance may finish requests that arrived after it was judged idle.
DRAIN_S = 30.0
# A starting instance's /health is asked this often: a forked SmolLM2 agent is ready ~0.35 s
# after its load begins, so a 0.1 s poll added ~50 ms on average to every cold start.
HEALTH_POLL_S = 0.02
HEALTH_REQUEST_TIMEOUT_S = 3.0
# A running instance that misses this many health checks in a row is declared hung.
MAX_MISSED_HEALTH = 3


# A container's hard memory limit over its reservation: the benchmarked figure is within ~1% of
# the observed peak (benchmarks/bench_memory.py), so 25% covers longer prompts than measured
# without letting one instance take the host.
MEM_LIMIT_HEADROOM = 1.25
# Below this a limit would only make tiny test models fail to import torch.
MEM_LIMIT_FLOOR_BYTES = 512 * 1024 * 1024


def mem_limit(reserved_bytes: int) -> int | None:
    """The runtime memory limit for an instance holding `reserved_bytes`; None when unmeasured."""
    if reserved_bytes <= 0:
        return None
    return max(MEM_LIMIT_FLOOR_BYTES, int(reserved_bytes * MEM_LIMIT_HEADROOM))


class StartFailed(InstanceFailed):
    """The instance did not start."""


@dataclass(frozen=True)
class Route:
    """Where a RUNNING instance of a model listens."""

    instance_id: int
    model: str
    endpoint: str


class ProgressWatch:
    """`async with` block that `Supervisor._health_seen` can give a deadline, as a class.

    Entered once per agent read of a stream: an `asynccontextmanager` cost 6.6 us a block here
    against 2.8 us for the bare `asyncio.Timeout` it wraps, which a 200-chunk stream paid per read.
    """

    __slots__ = ("_deadline", "_id", "_since", "_supervisor", "_waiters")

    def __init__(
        self,
        since: dict[int, float],
        waiters: dict[int, set[asyncio.Timeout]],
        instance_id: int,
        supervisor: Supervisor,
    ) -> None:
        self._since = since
        self._waiters = waiters
        self._id = instance_id
        self._supervisor = supervisor

    async def __aenter__(self) -> asyncio.Timeout:
        since = self._since.get(self._id)
        when = None if since is None else since + self._supervisor.progress_timeout_s
        deadline = self._deadline = asyncio.Timeout(when)
        await deadline.__aenter__()
        waiting = self._waiters.get(self._id)
        if waiting is None:
            waiting = self._waiters[self._id] = set()
        waiting.add(deadline)
        return deadline

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        waiting = self._waiters.get(self._id)
        if waiting is not None:
            waiting.discard(self._deadline)
            if not waiting:
                del self._waiters[self._id]
        # Turns its own cancellation into TimeoutError; never swallows an exception.
        await self._deadline.__aexit__(exc_type, exc, tb)


class Supervisor:
    def __init__(
        self,
        pool: Pool,
        runtime: Runtime,
        session: aiohttp.ClientSession,
        activity: Activity,
        model_store: Path,
        *,
        max_queue: int = 8,
        start_timeout_s: float | None = None,
        stop_on_exit: bool = False,
        lease_grace_s: float = DEFAULT_LEASE_GRACE_S,
        progress_timeout_s: float = 5.0,
    ) -> None:
        self.lease_grace_s = lease_grace_s
        self.progress_timeout_s = progress_timeout_s
        # Instances whose health checks fail, since when (loop time); and the deadlines of the
        # requests waiting on each (see progress_watch).
        self._unhealthy_since: dict[int, float] = {}
        self._progress_waiters: dict[int, set[asyncio.Timeout]] = {}
        self.start_timeout_s = start_timeout_s
        self.stop_on_exit = stop_on_exit
        self._starting: set[int] = set()
        self.pool = pool
        self.runtime = runtime
        self.session = session
        self.agents = AgentClient(session, HEALTH_REQUEST_TIMEOUT_S)
        self.activity = activity
        self.model_store = model_store
        self.max_queue = max_queue
        self._routes: dict[str, Route] = {}
        # Local route changes, counted, and the count at each model's last one (refresh_routes).
        self._route_changes = 0
        self._route_changed: dict[str, int] = {}
        # Told each instance's model and load time once it runs (the load-duration metric).
        self.on_loaded: Callable[[str, float], None] = lambda model, seconds: None
        self._running_events: dict[str, asyncio.Event] = {}
        # Requests waiting in each instance's queue, as its last health check said.
        self.queued: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._missed: dict[int, int] = {}
        self._started_here: set[int] = set()
        self._failing: set[int] = set()  # being stopped by fail_and_stop right now
        # A GPU's free memory now (NVML); a stopped GPU instance is released once it is back.
        self.read_gpu_free: FreeReader = capacity.gpu_free

    # -- routing ---------------------------------------------------------------------------

    def routed_instances(self) -> set[int]:
        """The ids of the instances calls are routed to now."""
        return {route.instance_id for route in self._routes.values()}

    def route(self, model: str) -> Route | None:
        return self._routes.get(model)

    def running_models(self) -> list[str]:
        """The models with a RUNNING instance, as of the last route refresh."""
        return sorted(self._routes)

    async def refresh_routes(self) -> None:
        """Reload the routing table from the database (instances other nodes started too).

        Rows come oldest first, so a model with two RUNNING instances (an API rolling over)
        is routed to the newest.
        """
        began = self._route_changes
        rows = await queries.live_instances(self.pool)
        routes = {
            r.model: Route(r.id, r.model, r.endpoint)
            for r in rows
            if r.state == State.RUNNING and r.endpoint
        }
        # A change made here while the rows were read is newer than they are: it stays (else a
        # stale read could route an API's calls back to the version it just rolled over from).
        for model, change in self._route_changed.items():
            if change > began:
                if (local := self._routes.get(model)) is None:
                    routes.pop(model, None)
                else:
                    routes[model] = local
        self._routes = routes
        for model in set(self._running_events) & set(self._routes):
            self._running_events.pop(model).set()

    async def wait_running(self, model: str, timeout_s: float) -> Route | None:
        """Wait up to `timeout_s` for the model's STARTING instance to run; None if it did not.

        Every waiter for one model shares the one load in progress: they wait on the same event,
        set when the instance becomes RUNNING here, and look at the database every 0.5 s for an
        instance another control plane is starting.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (route := self.route(model)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            event = self._running_events.setdefault(model, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), min(remaining, 0.5))
            except TimeoutError:
                row = await queries.latest_instance_for_model(self.pool, model)
                if row is None or row.state != State.STARTING:
                    await self.refresh_routes()
                    return self.route(model)
                if row.endpoint and row.state == State.RUNNING:
                    self._set_route(row)
        return route

    def _changed(self, model: str) -> None:
        self._route_changes += 1
        self._route_changed[model] = self._route_changes

    def _set_route(self, row: InstanceRow) -> None:
        """Route to a RUNNING row, unless a newer instance of its model is routed to (a
        redeployed API's new version, RUNNING beside the one it replaces); unroute a row that
        no longer runs."""
        current = self._routes.get(row.model)
        self._changed(row.model)
        if row.state == State.RUNNING and row.endpoint:
            if current is not None and current.instance_id > row.id:
                return
            self._routes[row.model] = Route(row.id, row.model, row.endpoint)
            event = self._running_events.pop(row.model, None)
            if event is not None:
                event.set()
        elif current is not None and current.instance_id == row.id:
            del self._routes[row.model]

    # -- load ------------------------------------------------------------------------------

    async def update_live(
        self, model: str, concurrency: int, expiration_s: int
    ) -> InstanceRow | None:
        """Apply new settings to the model's live instance (a repeated load); None if none."""
        row = await queries.update_live_instance_settings(
            self.pool, model, concurrency, expiration_s
        )
        if row is None:
            live = await queries.latest_instance_for_model(self.pool, model)
            if live is not None and live.state == State.STOPPING:
                raise InstanceStopping(
                    "the model's instance is stopping; load it again in a moment"
                )
            return None
        if row.state == State.RUNNING and row.endpoint:
            await self._push_concurrency(row)
        return row

    def launch(
        self, row: InstanceRow, model: ModelRow, evicted: tuple[InstanceRow, ...] = ()
    ) -> None:
        """Start an admitted STARTING instance in the background, after its evictions are gone.

        Evicted memory counts as free only once those instances are really stopped, so the new
        instance waits for them.
        """
        self._starting.add(row.id)
        self._spawn(self._evict_then_start(row, model, evicted))

    async def _evict_then_start(
        self, row: InstanceRow, model: ModelRow, evicted: tuple[InstanceRow, ...]
    ) -> None:
        if evicted:
            await asyncio.gather(*(self.finish_stopping(v) for v in evicted))
        await self._start(row, model)

    async def _push_concurrency(self, row: InstanceRow) -> None:
        if row.endpoint is None:
            return
        if not await self.agents.set_concurrency(row.endpoint, row.concurrency):
            logger.warning("instance %s did not take its new concurrency", row.id)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self, row: InstanceRow, model: ModelRow) -> None:
        launched: Launched | None = None
        self._starting.add(row.id)
        try:
            target = await prepare_model(model, self.model_store, parse_engine(row.engine))
            # The runtime's limit is on host memory: beside a GPU, that is the host part.
            host_bytes = (
                row.reserved_bytes
                if local_of(row.device) == HOST_DEVICE
                else row.host_reserved_bytes
            )
            spec = InstanceSpec(
                instance_id=row.id,
                generation=row.generation,
                model=row.model,
                model_dir=target.model_dir,
                gguf_file=target.gguf_file,
                concurrency=row.concurrency,
                max_queue=self.max_queue,
                device=row.device,
                mem_limit_bytes=mem_limit(host_bytes),
                reserve_bytes=host_bytes,
                python=target.python,
                engine=target.engine,
                project_dir=target.model_dir if model.source_kind == "apis" else None,
            )
            launch_started = time.monotonic()
            launched = await self.runtime.start(spec)
            self._started_here.add(row.id)
            await queries.set_instance_handle(self.pool, row.id, launched.handle, launched.endpoint)
            await self._wait_healthy(
                launched, self.start_timeout_s or health_timeout_s(model.param_bytes)
            )
            running = await queries.mark_running(
                self.pool, row.id, launched.endpoint, launched.handle
            ) or await self._adopted_meanwhile(row.id, launched)
            if running is None:
                # Deleted (or failed) while starting: nothing may be left running.
                await self.runtime.stop(launched.handle, STOP_GRACE_S)
                await self._finish_stop(row.id)
                return
            self._set_route(running)
            self.on_loaded(row.model, time.monotonic() - launch_started)
            logger.info("instance %s of %s is running", row.id, row.model)
        except asyncio.CancelledError:
            if launched is not None:
                await self.runtime.stop(launched.handle, STOP_GRACE_S)
            raise
        except Exception as exc:
            if isinstance(exc, MlcpError | ModelStoreError):
                reason = exc.message
            else:
                reason = "could not start the instance"
                logger.exception("starting instance %s failed", row.id)
            if launched is not None:
                await self.runtime.stop(launched.handle, STOP_GRACE_S)
            await self._fail(row.id, reason)
        finally:
            self._starting.discard(row.id)

    async def _adopted_meanwhile(self, instance_id: int, launched: Launched) -> InstanceRow | None:
        """The row if another control plane marked this very launch RUNNING, else None.

        Another control plane's reconciler may adopt an instance this one is still launching
        and mark it RUNNING first; it is then ours and theirs alike, not deleted. Stopping it
        here killed 3 of 6 loads with two control planes on one database (issue 17).
        """
        row = await queries.get_instance(self.pool, instance_id)
        if row is not None and row.state == State.RUNNING and row.handle == launched.handle:
            return row
        return None

    async def _wait_healthy(self, launched: Launched, timeout_s: float) -> None:
        async def exited() -> str | None:
            gone = await self.runtime.exited(launched.handle)
            return gone.reason if gone is not None else None

        try:
            await self.agents.wait_ready(launched.endpoint, timeout_s, exited, poll_s=HEALTH_POLL_S)
        except AgentNotReady as exc:
            raise StartFailed(str(exc)) from None

    # -- stop ------------------------------------------------------------------------------

    async def delete(self, row: InstanceRow) -> InstanceRow:
        """Stop a model's latest instance if it is live (user request); return its row now."""
        if row.state in (State.STARTING, State.RUNNING):
            stopped = await self.stop(row, "deleted by request", drain=False)
            return stopped or row
        return row

    async def stop(
        self, row: InstanceRow, reason: str, *, drain: bool = True
    ) -> InstanceRow | None:
        moving = await queries.transition_instance(
            self.pool, row.id, State.STOPPING, reason, allowed_from(State.STOPPING)
        )
        if moving is None:
            return await queries.get_instance(self.pool, row.id)
        return await self.finish_stopping(moving, drain=drain)

    async def finish_stopping(self, row: InstanceRow, *, drain: bool = True) -> InstanceRow | None:
        """Stop the runtime instance of a STOPPING row and mark it STOPPED once it is gone.

        With `drain`, requests that reached the instance after it was judged idle (a request on
        another control plane, up to one activity flush late) finish first, within a deadline.
        """
        self._set_route(row)
        if drain and row.endpoint and row.handle:
            await self._drain(row.endpoint, row.id)
        # NVML reads this host's GPUs only: a GPU of another node is released when it is gone.
        on_gpu = (
            row.device.startswith("cuda") and node_of(row.device) is None and row.reserved_bytes > 0
        )
        free_before = await asyncio.to_thread(self.read_gpu_free, row.device) if on_gpu else None
        if row.handle:
            await self.runtime.stop(row.handle, STOP_GRACE_S)
        if on_gpu:
            # Its reservation (the STOPPING row) holds until the driver shows the memory back.
            await wait_for_recovery(row.device, row.reserved_bytes, free_before, self.read_gpu_free)
        return await self._finish_stop(row.id, row.reason)

    async def _drain(self, endpoint: str, instance_id: int) -> None:
        """Until the agent has nothing in flight and neither has this control plane's relay
        (a call routed here just before the stop may not have reached the agent yet)."""
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            try:
                health = await self.agents.health(endpoint)
            except (AgentUnreachable, AgentNotReady):
                return  # not serving: nothing to wait for
            if health["inFlight"] <= 0 and self.activity.in_flight(instance_id) <= 0:
                return
            await asyncio.sleep(0.1)

    async def _finish_stop(self, instance_id: int, reason: str | None = None) -> InstanceRow | None:
        self.activity.forget(instance_id)
        self._started_here.discard(instance_id)
        done = await queries.transition_instance(
            self.pool, instance_id, State.STOPPED, reason or "stopped", allowed_from(State.STOPPED)
        )
        return done or await queries.get_instance(self.pool, instance_id)

    async def _fail(self, instance_id: int, reason: str) -> None:
        row = await queries.transition_instance(
            self.pool, instance_id, State.FAILED, reason, allowed_from(State.FAILED)
        )
        self.activity.forget(instance_id)
        self._started_here.discard(instance_id)
        self._missed.pop(instance_id, None)
        if row is not None:
            self._set_route(row)
            logger.warning("instance %s of %s failed: %s", row.id, row.model, reason)

    async def fail_and_stop(self, row: InstanceRow, reason: str) -> None:
        """Make sure nothing of an instance keeps running, then mark it FAILED.

        In that order: FAILED releases its memory reservation, which must not happen while a hung
        agent still holds the memory.
        """
        if (current := self._routes.get(row.model)) and current.instance_id == row.id:
            del self._routes[row.model]
            self._changed(row.model)
        # Stopping it breaks its open requests; their failure checks must not record the kill
        # ("process is gone") as the reason instead of this one.
        self._failing.add(row.id)
        try:
            if row.handle:
                await self.runtime.stop(row.handle, STOP_GRACE_S)
            await self._fail(row.id, reason)
        finally:
            self._failing.discard(row.id)

    # -- watch -----------------------------------------------------------------------------

    async def renew_launches(self) -> None:
        """Tell other control planes' reconcilers the launches under way here are alive."""
        if self._starting:
            await queries.renew_launches(self.pool, sorted(self._starting))

    async def check(self) -> None:
        """One pass over RUNNING instances: crashed → FAILED, hung → FAILED and killed."""
        rows = await queries.live_instances(self.pool)
        # Leases run to an expiry written by the database's clock: measured by it too, so a
        # step of this host's clock neither shortens nor stretches them (issue 17).
        now = await queries.database_now(self.pool) if rows else None
        for row in rows:
            if row.state != State.RUNNING or not row.handle or not row.endpoint:
                continue
            assert now is not None
            try:
                exited = await self.runtime.exited(row.handle)
            except MlcpError:
                # The runtime itself is unavailable (a Docker engine restarting): that says
                # nothing about this instance; check it again at the next pass.
                logger.warning("could not ask the runtime about instance %s", row.id)
                continue
            if exited is not None:
                await self.fail_and_stop(row, exited.reason)
                continue
            await self._probe(row, now)
        await self.refresh_routes()

    def lease_s(self, row: InstanceRow, now: datetime) -> float:
        """How long the instance may live without another renewal: to its expiry, at least
        the grace period (renewed at every health check, by any control plane)."""
        return max((row.expires_at - now).total_seconds(), self.lease_grace_s)

    def progress_watch(self, instance_id: int) -> ProgressWatch:
        """Raise TimeoutError in the block once the instance has not answered a health check
        for `progress_timeout_s` (issue 17: a hung instance made clients wait ~17 s for its
        kill). Nothing fires while no check runs (a database outage stops the check pass)."""
        return ProgressWatch(self._unhealthy_since, self._progress_waiters, instance_id, self)

    def _health_seen(self, instance_id: int, ok: bool, probe_started: float) -> None:
        """Arm (first miss) or disarm (an answer) the deadlines of requests waiting on it."""
        if ok:
            if self._unhealthy_since.pop(instance_id, None) is not None:
                for deadline in self._progress_waiters.get(instance_id, ()):
                    deadline.reschedule(None)
            return
        if instance_id in self._unhealthy_since:
            return
        self._unhealthy_since[instance_id] = probe_started
        for deadline in self._progress_waiters.get(instance_id, ()):
            deadline.reschedule(probe_started + self.progress_timeout_s)

    async def _probe(self, row: InstanceRow, now: datetime) -> None:
        assert row.endpoint is not None
        probe_started = asyncio.get_running_loop().time()
        body: HealthReady | None
        try:
            body = await self.agents.health(row.endpoint, lease_s=self.lease_s(row, now))
        except (AgentUnreachable, AgentNotReady):
            body = None
        self._health_seen(row.id, body is not None, probe_started)
        if body is None:
            missed = self._missed.get(row.id, 0) + 1
            self._missed[row.id] = missed
            if missed >= MAX_MISSED_HEALTH:
                await self.fail_and_stop(
                    row, f"the instance stopped answering health checks ({missed} missed)"
                )
            return
        self._missed.pop(row.id, None)
        queued = body.get("queued") if isinstance(body, dict) else None
        self.queued[row.id] = queued if isinstance(queued, int) else 0
        memory = body.get("memory") if isinstance(body, dict) else None
        peak = memory.get("peakRssBytes") if isinstance(memory, dict) else None
        if isinstance(peak, int) and peak > 0:
            await queries.record_observed_memory(self.pool, row.id, peak)
            gpu = memory.get("peakGpuBytes") if isinstance(memory, dict) else None
            # Corrects the model's profile over time (benchmarker issue): the highest seen per
            # concurrency, raising requiredRAM when a running instance exceeds it.
            await queries.record_model_observation(
                self.pool,
                row.model,
                kind_of(row.device),
                row.concurrency,
                peak,
                gpu if isinstance(gpu, int) else None,
            )

    def request_failed(self, instance_id: int) -> None:
        """A proxied request lost its connection: check that instance soon, without waiting."""
        self._spawn(self.instance_failed_during_request(instance_id))

    async def instance_failed_during_request(self, instance_id: int) -> None:
        """A proxied request lost its connection: check that instance now, not at the next pass."""
        if instance_id in self._failing:
            return
        row = await queries.get_instance(self.pool, instance_id)
        if row is None or row.state != State.RUNNING or not row.handle:
            return
        for _ in range(10):
            exited = await self.runtime.exited(row.handle)
            if instance_id in self._failing:
                return
            if exited is not None:
                await self.fail_and_stop(row, exited.reason)
                return
            await asyncio.sleep(0.05)

    def starting_here(self) -> set[int]:
        """Instances this control plane is starting right now."""
        return set(self._starting)

    async def adopt(self, row: InstanceRow, found: Listed) -> None:
        """Take over an instance found running (after a restart): RUNNING keeps its expiry."""
        if row.handle != found.handle or (found.endpoint and row.endpoint != found.endpoint):
            updated = await queries.set_instance_handle(
                self.pool, row.id, found.handle, found.endpoint or row.endpoint
            )
            row = updated or row
        if row.state == State.STARTING and row.endpoint:
            self._spawn(self._finish_start(row, Launched(found.handle, row.endpoint)))
        else:
            self._set_route(row)

    async def _finish_start(self, row: InstanceRow, launched: Launched) -> None:
        self._starting.add(row.id)
        try:
            await self._wait_healthy(launched, self.start_timeout_s or health_timeout_s(None))
            running = await queries.mark_running(
                self.pool, row.id, launched.endpoint, launched.handle
            )
            if running is not None:
                self._set_route(running)
        except MlcpError as exc:
            await self.fail_and_stop(row, exc.message)
        finally:
            self._starting.discard(row.id)

    async def close(self) -> None:
        """Cancel start-ups in progress; stop running instances only if configured to.

        By default a control-plane restart is not a stop: the next start adopts the instances.
        """
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if not self.stop_on_exit:
            return
        for instance_id in list(self._started_here):
            row = await queries.get_instance(self.pool, instance_id)
            if row is not None and row.state in (State.STARTING, State.RUNNING):
                await self.stop(row, "the control plane shut down")
