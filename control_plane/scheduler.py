"""The control plane's periodic loops: which coroutine runs how often, on the monotonic clock.

The coroutines live elsewhere and tests call them directly. This was APScheduler's interval
trigger, which plans every run by the wall clock: after the host's clock stepped back an hour
(NTP, a VM resumed), every loop waited that hour, so no health check renewed any agent's lease,
the reaper stopped and activity was never flushed (tests/faults/test_clock_jump.py). A run here
is planned on the event loop's clock, which is monotonic; like the APScheduler setup it
replaces, a job never overlaps itself and missed runs are coalesced into one.
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
from control_plane.outage import DatabaseOutage, is_outage
from control_plane.pending_loads import PENDING_INTERVAL_S, load_pending
from control_plane.reaper import REAP_INTERVAL_S, reap_by_database_clock
from control_plane.reconciler import RECONCILE_INTERVAL_S, reconcile_by_database_clock
from control_plane.state import AppState

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.2
CHECK_INTERVAL_S = 2.0
ROUTES_INTERVAL_S = 1.0
ASYNC_CLEANUP_INTERVAL_S = 60.0
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

    def every(seconds: float, name: str, job: Callable[[], Awaitable[object]]) -> None:
        scheduler.add(seconds, name, _guarded(name, job, state.outage))

    every(FLUSH_INTERVAL_S, "flush-activity", lambda: act.flush(pool))
    every(REAP_INTERVAL_S, "reaper", lambda: reap_by_database_clock(pool, sup, act))
    every(CHECK_INTERVAL_S, "instance-check", sup.check)
    every(ROUTES_INTERVAL_S, "routes", sup.refresh_routes)
    every(RECONCILE_INTERVAL_S, "reconciler", lambda: reconcile_by_database_clock(sup))
    every(PENDING_INTERVAL_S, "pending-loads", lambda: load_pending(state))
    every(
        ASYNC_CLEANUP_INTERVAL_S, "async-cleanup", lambda: clean_up_async(state, datetime.now(UTC))
    )
    every(
        state.settings.catalog_refresh_s, "catalog", lambda: refresh_catalog(pool, state.settings)
    )
    if state.grpc is not None:
        every(state.settings.catalog_refresh_s, "grpc-services", state.grpc.refresh)
    return scheduler
