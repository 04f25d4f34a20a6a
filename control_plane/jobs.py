"""Model jobs: request a model (fetch and benchmark it); the answer is its latest job.

The answer is always the state of the model's latest job, in the Bytez v1 shape. Decisions for
one model are serialized by a transaction-scoped advisory lock, and the partial unique index on
live jobs backs it up, so any number of concurrent requests make one job.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from benchmarker.hub import hub_unavailable, not_found_offline
from benchmarker.sources import find_locally
from control_plane.schemas import MODEL, iso
from control_plane.settings import Settings
from db import queries
from db.pool import Pool
from db.rows import ModelJobRow, ModelRow

# Field names and messages of the public contract.
SUCCESS = "success"
MESSAGE = "message"
START_TIME = "startTime"
END_TIME = "endTime"
MODIFIED = "modified"
MESSAGE_QUEUED = "Model is already queued"
MESSAGE_AVAILABLE = "Model available"

# A failed job is the answer for this long, so a script polling until "Model available" sees
# the failure instead of re-queuing the model on its next poll; after it, a request re-queues.
FAILED_JOB_HOLD_S = 60.0
_LIVE = ("queued", "benchmarking")
_ANY = ("queued", "benchmarking", "available", "failed")


def render_job(model: str, job: ModelJobRow) -> dict[str, Any]:
    """A job in the Bytez v1 shape."""
    if job.state == "available":
        success, message = True, MESSAGE_AVAILABLE
    elif job.state == "failed":
        success, message = False, job.reason or "Model could not be benchmarked"
    else:
        success, message = True, MESSAGE_QUEUED
    return {
        MODEL: model,
        SUCCESS: success,
        MESSAGE: message,
        START_TIME: iso(job.started_at) if job.state != "queued" else None,
        END_TIME: iso(job.finished_at) if job.state in ("available", "failed") else None,
        MODIFIED: iso(job.modified_at),
    }


def render_measured(row: ModelRow, job: ModelJobRow | None) -> dict[str, Any]:
    """A model that is measured: its last successful job, or the catalog's own timestamp."""
    if job is not None:
        return render_job(row.name, job)
    return {
        MODEL: row.name,
        SUCCESS: True,
        MESSAGE: MESSAGE_AVAILABLE,
        START_TIME: None,
        END_TIME: iso(row.benchmarked_at),
        MODIFIED: iso(row.benchmarked_at),
    }


def is_measured(row: ModelRow | None) -> bool:
    return row is not None and row.present and row.required_ram_bytes is not None


def failure_stands(job: ModelJobRow, now: datetime) -> bool:
    """Whether a failed job is still the answer (see FAILED_JOB_HOLD_S)."""
    ended = job.finished_at or job.modified_at
    return now - ended < timedelta(seconds=FAILED_JOB_HOLD_S)


async def request_model_job(
    db: Pool, settings: Settings, model: str, now: datetime
) -> dict[str, Any]:
    """Answer a /model/job request for a validated model id, queuing a job when one is due."""
    async with db.acquire() as conn, conn.transaction():
        await queries.lock_model_requests(conn, model)
        row = await queries.get_model(conn, model)
        if is_measured(row):
            assert row is not None
            return render_measured(row, await queries.latest_model_job(conn, model, ["available"]))
        latest = await queries.latest_model_job(conn, model, _ANY)
        if latest is not None and latest.state in _LIVE:
            return render_job(model, latest)
        local = await find_locally(conn, settings, model)
        if latest is not None and latest.state == "failed" and failure_stands(latest, now):
            # A model that was missing and has appeared since is worth a new job at once.
            if not (latest.error_code == "not_found" and local is not None):
                return render_job(model, latest)
        if local is None:
            why = await hub_unavailable()
            if why is not None:
                error = not_found_offline(model, why)
                failed = await queries.insert_failed_model_job(
                    conn, model, error.code, error.message
                )
                return render_job(model, failed)
        job = await queries.enqueue_model_job(conn, model)
        if job is None:  # a control plane not taking the lock (older version) won the race
            job = await queries.latest_model_job(conn, model, _LIVE)
        assert job is not None
        return render_job(model, job)
