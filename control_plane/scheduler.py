"""APScheduler wiring only: which coroutine runs how often. The coroutines live elsewhere and
tests call them directly."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from control_plane.async_requests import clean_up as clean_up_async
from control_plane.bootstrap import refresh_catalog
from control_plane.outage import DatabaseOutage, is_outage
from control_plane.pending_loads import PENDING_INTERVAL_S, load_pending
from control_plane.reaper import REAP_INTERVAL_S, reap_by_database_clock
from control_plane.reconciler import RECONCILE_INTERVAL_S, reconcile_by_database_clock
from control_plane.state import AppState

logger = logging.getLogger(__name__)
# APScheduler logs every run at INFO and every skipped overlap at WARNING; at 4-5 runs a second
# both are noise.
logging.getLogger("apscheduler").setLevel(logging.ERROR)

FLUSH_INTERVAL_S = 0.2
CHECK_INTERVAL_S = 2.0
ROUTES_INTERVAL_S = 1.0
ASYNC_CLEANUP_INTERVAL_S = 60.0


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


def build_scheduler(state: AppState) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(timezone=UTC)
    sup, act, pool = state.supervisor, state.activity, state.pool

    def every(seconds: float, name: str, job: Callable[[], Awaitable[object]]) -> None:
        scheduler.add_job(
            _guarded(name, job, state.outage),
            "interval",
            seconds=seconds,
            id=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

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
