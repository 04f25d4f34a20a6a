"""The async-request worker: claim, route to an instance (loading it on demand), run, finish.

Shaped like procrastinate's worker: it waits on "work, interval or stop", runs at most
`MLCP_ASYNC_WORKERS` requests at once, and never dies on one request's failure. The queue side
(batched claims, grouped starts and finishes, one heartbeat statement for every held lease) is
`async_queue.QueueWorker`; this module is what is done with a claimed request. A heartbeat that
no longer matches (the client cancelled, or another control plane took the request over)
aborts the call at once, which closes the upstream connection and stops generation at the
instance. A control plane that dies leaves its leases to expire; `reclaim_async_requests` then
queues them again (retried once) or fails them with the reason, so nothing stays in
`processing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import anyio.to_thread

from control_plane import relay, uploads
from control_plane.async_queue import STOP_DEADLINE_S, QueueWorker
from control_plane.errors import InstanceBusy, InstanceStopping, MlcpError, Unavailable
from control_plane.lifecycle import State
from control_plane.limits import effective
from control_plane.loading import OnDemand, route_to
from control_plane.outage import is_outage
from control_plane.state import AppState
from control_plane.supervisor import Route
from db import async_queries as aq
from db import queries
from db.rows import AsyncRequestRow

logger = logging.getLogger(__name__)

# A request waiting for its model to load is tried again after this.
RETRY_S = 1.0


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class AsyncWorker:
    """Runs claimed async requests; one per control plane."""

    def __init__(self, state: AppState, worker_id: str) -> None:
        self.state = state
        settings = state.settings
        self.queue = QueueWorker(
            state.pool,
            worker_id,
            settings.async_workers,
            settings.async_lease_s,
            self._run,
            self._failed_pass,
        )
        self.wake = self.queue.wake

    def _failed_pass(self, exc: Exception) -> None:
        # A database outage is logged once for every loop (control_plane/outage.py), not as a
        # traceback per pass.
        if is_outage(exc):
            loop = asyncio.get_running_loop()
            self.state.outage.failed("async worker", exc, loop.time())
        else:
            logger.exception("async worker pass failed; retrying", exc_info=exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process until `stop` is set; then hand back what is held."""
        await self.queue.run(stop)

    async def _run(self, row: AsyncRequestRow) -> None:
        state, queue = self.state, self.queue
        if state.supervisor.route(row.model) is None:
            # Only a request that would wait for a load can have seen that load fail.
            failure = await _load_failure(state, row)
            if failure is not None:
                await queue.finish(row, "failed", None, failure)
                return
        on_demand = OnDemand(
            row.key_id, 1, state.settings.on_demand_expiration_s, await _max_instances(state, row)
        )
        try:
            route = await route_to(state, row.model, 0, on_demand)
        except (Unavailable, InstanceStopping) as exc:
            # Loading (or stopping, or full): the request waits in 'pending' saying why.
            await queue.defer(row, exc.message, RETRY_S)
            return
        except MlcpError as exc:
            await queue.finish(row, "failed", None, exc.message)
            return
        if not await queue.start(row):
            return  # cancelled while it was routed
        if row.upload_id is not None:
            await self._transcribe(row, route)
            return
        try:
            answer = await relay.call(state, route, row.input, _never_disconnects)
        except InstanceBusy as exc:
            await queue.defer(row, exc.message, RETRY_S)
            return
        except MlcpError as exc:
            await queue.finish(row, "failed", None, exc.message)
            return
        if not isinstance(answer, dict) or not isinstance(answer.get("output"), str):
            reason = "the model instance sent an invalid answer"
            await queue.finish(row, "failed", None, reason)
            return
        result = {"text": answer["output"], "tokens_generated": answer.get("tokens_generated")}
        await queue.finish(row, "success", result, None)

    async def _transcribe(self, row: AsyncRequestRow, route: Route) -> None:
        """Send the request's upload to the instance's /transcribe; its answer is the result."""
        state, queue = self.state, self.queue
        assert row.upload_id is not None
        upload = await aq.get_upload(state.pool, row.upload_id)
        try:
            if upload is None:
                raise FileNotFoundError(row.upload_id)
            data = await anyio.to_thread.run_sync(uploads.file_path(state, upload).read_bytes)
        except OSError:
            await queue.finish(row, "failed", None, "the upload is gone")
            return
        path = "/transcribe?options=" + quote(json.dumps(row.input, separators=(",", ":")))
        try:
            answer = await relay.call(state, route, data, _never_disconnects, path)
        except InstanceBusy as exc:
            await queue.defer(row, exc.message, RETRY_S)
            return
        except MlcpError as exc:
            await queue.finish(row, "failed", None, exc.message)
            return
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            reason = "the model instance sent an invalid answer"
            await queue.finish(row, "failed", None, reason)
            return
        result = {k: answer.get(k) for k in ("text", "chunks", "ignored", "audio_seconds")}
        await queue.finish(row, "success", result, None)


async def _load_failure(state: AppState, row: AsyncRequestRow) -> str | None:
    """Why the model's instance failed since this request began waiting, if it did.

    The request is not retried into a load loop: an instance started for it that failed ends it.
    """
    latest = await queries.latest_instance_for_model(state.pool, row.model)
    if latest is None or latest.state != State.FAILED or row.pending_at is None:
        return None
    if latest.created_at < row.pending_at:
        return None
    return f"the instance of {row.model} failed: {latest.reason or 'unknown reason'}"


@contextlib.asynccontextmanager
async def async_worker(state: AppState, worker_id: str) -> AsyncIterator[AsyncWorker]:
    """Run the worker for the lifespan of the block; on exit stop it and hand back its requests."""
    worker = AsyncWorker(state, worker_id)
    state.wake_async = worker.wake.set
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop), name="async-worker")
    try:
        yield worker
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, STOP_DEADLINE_S * 2)
        except TimeoutError:
            logger.warning("async worker did not stop in time")


async def _max_instances(state: AppState, row: AsyncRequestRow) -> int:
    """The submitting key's maxInstances, looked up only when the model would be loaded."""
    if state.supervisor.route(row.model) is not None:
        return 0
    key = await queries.get_active_key(state.pool, row.key_id)
    if key is None:
        return 0
    return effective(key.limits, key.scope, state.limiter.defaults).max_instances
