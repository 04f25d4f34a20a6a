"""The async-request worker loop: claim, route to an instance (loading it on demand), run, finish.

Shaped like procrastinate's worker: it waits on "work, interval or stop", runs at most
`MLCP_ASYNC_WORKERS` requests at once, and never dies on one request's failure. Each claimed
request holds a lease kept by heartbeats; a heartbeat that no longer matches (the client
cancelled, or another control plane took the request over) aborts the call at once, which closes
the upstream connection and stops generation at the instance. A control plane that dies leaves
its leases to expire; `reclaim_async_requests` then queues them again (retried once) or fails
them with the reason, so nothing stays in `processing`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import anyio.to_thread

from control_plane import relay, uploads
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

# How often a held request's lease is renewed and its cancellation noticed (cancel within 1 s).
HEARTBEAT_S = 0.5
# How often an idle worker looks for work another control plane stored.
POLL_S = 0.2
# A request waiting for its model to load is tried again after this.
RETRY_S = 1.0
STOP_DEADLINE_S = 5.0


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


class LeaseLost(Exception):
    """The request was cancelled or taken over while this worker held it."""


class AsyncWorker:
    """Runs claimed async requests; one per control plane."""

    def __init__(self, state: AppState, worker_id: str) -> None:
        self.state = state
        self.worker_id = worker_id
        self.wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process until `stop` is set; then hand back what is held."""
        settings = self.state.settings
        loop = asyncio.get_running_loop()
        next_reclaim = 0.0
        while not stop.is_set():
            try:
                if loop.time() >= next_reclaim:
                    await aq.reclaim_async_requests(self.state.pool, settings.async_lease_s)
                    next_reclaim = loop.time() + settings.async_lease_s / 2
                while len(self._tasks) < settings.async_workers:
                    row = await aq.claim_async_request(
                        self.state.pool, self.worker_id, uuid.uuid4()
                    )
                    if row is None:
                        break
                    task = asyncio.create_task(self.process(row), name=f"async-{row.id}")
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
            except Exception as exc:
                # A database outage is logged once for every loop (control_plane/outage.py),
                # not as a traceback per pass.
                if is_outage(exc):
                    self.state.outage.failed("async worker", exc, loop.time())
                else:
                    logger.exception("async worker pass failed; retrying")
            self.wake.clear()
            await _first(stop, self.wake, POLL_S)
        await self._drain()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.wake.set()  # a slot is free

    async def _drain(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_DEADLINE_S)

    async def process(self, row: AsyncRequestRow) -> None:
        """Run one claimed request to its end, or hand it back."""
        assert row.lease_token is not None
        token = row.lease_token
        pool = self.state.pool
        try:
            async with _heartbeat(self.state, row.id, token):
                await self._run(row, token)
        except LeaseLost:
            return
        except asyncio.CancelledError:
            # Shutting down: queued again at once, without spending an attempt.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    aq.defer_async_request(pool, row.id, token, "the control plane stopped", 0)
                )
            raise
        except Exception:
            logger.exception("async request %s failed unexpectedly", row.id)
            with contextlib.suppress(Exception):
                await aq.finish_async_request(pool, row.id, token, "failed", None, "internal error")

    async def _run(self, row: AsyncRequestRow, token: uuid.UUID) -> None:
        state, pool = self.state, self.state.pool
        failure = await _load_failure(state, row)
        if failure is not None:
            await aq.finish_async_request(pool, row.id, token, "failed", None, failure)
            return
        on_demand = OnDemand(
            row.key_id, 1, state.settings.on_demand_expiration_s, await _max_instances(state, row)
        )
        try:
            route = await route_to(state, row.model, 0, on_demand)
        except (Unavailable, InstanceStopping) as exc:
            # Loading (or stopping, or full): the request waits in 'pending' saying why.
            await aq.defer_async_request(pool, row.id, token, exc.message, RETRY_S)
            return
        except MlcpError as exc:
            await aq.finish_async_request(pool, row.id, token, "failed", None, exc.message)
            return
        if await aq.start_async_request(pool, row.id, token) is None:
            return  # cancelled while it was routed
        if row.upload_id is not None:
            await self._transcribe(row, token, route)
            return
        try:
            answer = await relay.call(state, route, row.input, _never_disconnects)
        except InstanceBusy as exc:
            await aq.defer_async_request(pool, row.id, token, exc.message, RETRY_S)
            return
        except MlcpError as exc:
            await aq.finish_async_request(pool, row.id, token, "failed", None, exc.message)
            return
        if not isinstance(answer, dict) or not isinstance(answer.get("output"), str):
            reason = "the model instance sent an invalid answer"
            await aq.finish_async_request(pool, row.id, token, "failed", None, reason)
            return
        result = {"text": answer["output"], "tokens_generated": answer.get("tokens_generated")}
        await aq.finish_async_request(pool, row.id, token, "success", result, None)

    async def _transcribe(self, row: AsyncRequestRow, token: uuid.UUID, route: Route) -> None:
        """Send the request's upload to the instance's /transcribe; its answer is the result."""
        state, pool = self.state, self.state.pool
        assert row.upload_id is not None
        upload = await aq.get_upload(pool, row.upload_id)
        try:
            if upload is None:
                raise FileNotFoundError(row.upload_id)
            data = await anyio.to_thread.run_sync(uploads.file_path(state, upload).read_bytes)
        except OSError:
            await aq.finish_async_request(pool, row.id, token, "failed", None, "the upload is gone")
            return
        path = "/transcribe?options=" + quote(json.dumps(row.input, separators=(",", ":")))
        try:
            answer = await relay.call(state, route, data, _never_disconnects, path)
        except InstanceBusy as exc:
            await aq.defer_async_request(pool, row.id, token, exc.message, RETRY_S)
            return
        except MlcpError as exc:
            await aq.finish_async_request(pool, row.id, token, "failed", None, exc.message)
            return
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            reason = "the model instance sent an invalid answer"
            await aq.finish_async_request(pool, row.id, token, "failed", None, reason)
            return
        result = {k: answer.get(k) for k in ("text", "chunks", "ignored", "audio_seconds")}
        await aq.finish_async_request(pool, row.id, token, "success", result, None)


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


async def _first(stop: asyncio.Event, wake: asyncio.Event, timeout_s: float) -> None:
    """Wait until stop or wake is set, or `timeout_s` passed."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


@contextlib.asynccontextmanager
async def _heartbeat(
    state: AppState, request_id: uuid.UUID, token: uuid.UUID
) -> AsyncIterator[None]:
    """Renew the lease while the block runs; raise LeaseLost in it once the lease is gone."""
    task = asyncio.current_task()
    assert task is not None
    lost = False

    async def beat() -> None:
        nonlocal lost
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                held = await aq.heartbeat_async_request(state.pool, request_id, token)
            except Exception:
                logger.warning("heartbeat of async request %s failed; retrying", request_id)
                continue
            if not held:
                lost = True
                task.cancel()
                return

    beater = asyncio.create_task(beat())
    try:
        yield
    except asyncio.CancelledError:
        if lost and task.uncancel() == 0:
            raise LeaseLost() from None
        raise
    finally:
        beater.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beater


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
