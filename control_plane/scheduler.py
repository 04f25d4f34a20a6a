"""The control plane's periodic loops: which coroutine runs how often, on the monotonic clock.

`LOOPS` is the one table of every periodic loop and its interval; `build_scheduler` binds each
to its coroutine, which lives in the module that owns the rule (tests call those directly). The
long-running workers (benchmark jobs, async requests, webhooks, the event hub) are started and
stopped beside the scheduler in `app.py`'s lifespan; docs/architecture.md lists them all.

This was APScheduler's interval trigger, which plans every run by the wall clock: after the
host's clock stepped back an hour (NTP, a VM resumed), every loop waited that hour, so no health
check renewed any agent's lease, the reaper stopped and activity was never flushed
(tests/faults/test_clock_jump.py). A run here is planned on the event loop's clock, which is
monotonic; like the APScheduler setup it replaces, a job never overlaps itself and missed runs
are coalesced into one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from control_plane.async_requests import clean_up as clean_up_async
from control_plane.bootstrap import refresh_catalog
from control_plane.cluster import ray_runtime, watch_nodes
from control_plane.deploys import collect_blobs
from control_plane.outage import DatabaseOutage, is_outage
from control_plane.pending_loads import load_pending
from control_plane.reaper import reap_by_database_clock
from control_plane.reconciler import reconcile_by_database_clock
from control_plane.state import AppState

logger = logging.getLogger(__name__)

# name -> (interval in seconds, what a pass does); None: a setting's (MLCP_RAY_NODES_REFRESH_S for
# ray-nodes, MLCP_CATALOG_REFRESH_S for the others).
LOOPS: dict[str, tuple[float | None, str]] = {
    "flush-activity": (0.2, "write this node's per-instance request counters (activity.py)"),
    "flush-usage": (1.0, "write calls served per key, give back idle reserved calls (quotas.py)"),
    "reaper": (0.25, "stop instances idle past their expiry, by the database's clock"),
    "routes": (1.0, "refresh the in-memory table of RUNNING instances the proxy routes to"),
    "pending-loads": (1.0, "load models whose benchmark finished for loads that waited on it"),
    "instance-check": (2.0, "health-check instances started here, renewing their leases"),
    "launch-heartbeat": (2.0, "renew the STARTING rows this control plane is launching"),
    "reconciler": (10.0, "adopt instances whose launcher is gone; fail rows whose agent is gone"),
    "async-cleanup": (60.0, "delete async requests and uploads past their retention"),
    "api-blobs": (300.0, "remove weight blobs no version links, unused for MLCP_BLOB_GRACE_S"),
    "catalog": (None, "rediscover models in MLCP_MODEL_DIRS, the HF cache and packages"),
    "grpc-services": (None, "re-read projects' .proto services; close gone instances' channels"),
    "ray-nodes": (None, "read Ray's node table (MLCP_RUNTIME=ray); fail instances of lost nodes"),
}
# How long shutdown lets a pass under way finish (a flush writing counters) before cancelling it.
STOP_GRACE_S = 5.0


class Scheduler:
    """Interval jobs as asyncio tasks: `start` in the lifespan, `aclose` on the way out."""

    def __init__(self, stop_grace_s: float = STOP_GRACE_S) -> None:
        self._jobs: list[tuple[float, str, Callable[[], Awaitable[None]]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stop_grace_s = stop_grace_s

    def add(self, seconds: float, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self._jobs.append((seconds, name, run))

    def start(self) -> None:
        for seconds, name, run in self._jobs:
            self._tasks.append(asyncio.create_task(self._loop(seconds, run), name=f"mlcp-{name}"))

    async def _loop(self, seconds: float, run: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        next_at = loop.time() + seconds
        while not self._stopping:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self._running.add(task)
            try:
                await run()
            finally:
                self._running.discard(task)
            # Fixed rate; a pass that overran its interval is not caught up run by run.
            next_at = max(next_at + seconds, loop.time())

    async def aclose(self) -> None:
        """Stop every loop: idle ones at once, a pass under way after it ends (or the grace)."""
        self._stopping = True
        for task in self._tasks:
            if task not in self._running:
                task.cancel()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=self._stop_grace_s)
            for task in late:
                logger.warning(
                    "scheduled job %s did not finish in time; cancelled", task.get_name()
                )
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _guarded(
    name: str, job: Callable[[], Awaitable[object]], outage: DatabaseOutage
) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        try:
            await job()
        except Exception as exc:
            # A failed pass is retried at the next interval. A database outage is logged once
            # for all loops and requests, not as a traceback per pass (5 a second).
            if is_outage(exc):
                outage.failed(f"scheduled job {name}", exc, time.monotonic())
            else:
                logger.exception("scheduled job %s failed", name)
        else:
            if name in _DATABASE_JOBS:
                outage.ok(time.monotonic())

    return run


# Jobs whose every pass queries the database, so a pass that succeeds means it answers.
_DATABASE_JOBS = frozenset({"reaper", "routes", "reconciler"})


def build_scheduler(state: AppState) -> Scheduler:
    scheduler = Scheduler()
    sup, act, pool = state.supervisor, state.activity, state.pool

    jobs: dict[str, Callable[[], Awaitable[object]]] = {
        "flush-activity": lambda: act.flush(pool),
        "flush-usage": state.limiter.flush,
        "reaper": lambda: reap_by_database_clock(pool, sup, act),
        "routes": sup.refresh_routes,
        "pending-loads": lambda: load_pending(state),
        "instance-check": sup.check,
        "launch-heartbeat": sup.renew_launches,
        "reconciler": lambda: reconcile_by_database_clock(sup),
        "async-cleanup": lambda: clean_up_async(state, datetime.now(UTC)),
        "api-blobs": lambda: collect_blobs(state),
        "catalog": lambda: refresh_catalog(pool, state.settings),
    }
    if state.grpc is not None:
        jobs["grpc-services"] = state.grpc.refresh
    if ray_runtime(state) is not None:
        jobs["ray-nodes"] = lambda: watch_nodes(state)
    settings = {"ray-nodes": state.settings.ray_nodes_refresh_s}
    for name, job in jobs.items():
        seconds = LOOPS[name][0] or settings.get(name) or state.settings.catalog_refresh_s
        scheduler.add(seconds, name, _guarded(name, job, state.outage))
    return scheduler
