"""One control plane's side of the async-request queue, in as few statements as it can.

Claims take up to every free slot in one statement (`claim_async_requests`, fairest first);
starts and finishes that happen while one such statement runs go together in the next one
(group commit: alone, a request's statement is sent at once, so nothing waits for a batch to
fill); and one statement renews the leases of every request held (`heartbeat_async_requests`).
Statements on several requests lock their rows in id order, so two of them never deadlock.

`QueueWorker` is the loop around it: claim, hand each request to a handler as its own task,
renew the leases, and abort a task whose lease is gone (the client cancelled, or another control
plane took the request over). The control plane's async worker (async_worker.py) runs it with a
handler that routes to an instance; the queue benchmark (benchmarks/bench_async.py) with one
that does nothing, so the figure it prints is this loop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from uuid import UUID

from db import async_queries as aq
from db.pool import Pool
from db.rows import AsyncRequestRow

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# How often the held requests' leases are renewed and their cancellation noticed (within 1 s).
HEARTBEAT_S = 0.5
# How often an idle worker looks for work another control plane stored.
POLL_S = 0.2
STOP_DEADLINE_S = 5.0
# The most items one grouped statement carries.
MAX_BATCH = 256


class GroupCommit(Generic[T, R]):
    """Send items through `flush` (one statement for a list, answering one result per item):
    an item that comes while a flush runs goes with the next one, together with every other
    item that came meanwhile."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]]) -> None:
        self._flush = flush
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        # A caller cancelled while it waits leaves its item to be sent all the same; its
        # outcome is then nobody's to read.
        future.add_done_callback(_consume)
        self._waiting.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="group-commit")
        return await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                try:
                    results = await self._flush([item for item, _ in batch])
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._task = None
            for _, future in self._waiting:
                if not future.done():
                    future.set_exception(ConnectionError("the group commit stopped"))
            self._waiting.clear()


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass
class Held:
    """A request this worker holds, with the task running it."""

    row: AsyncRequestRow
    token: UUID
    task: asyncio.Task[None] | None = None
    # Its finish is under way: a lease found gone now is the finish's own doing.
    ending: bool = False
    lost: bool = False


Handler = Callable[[AsyncRequestRow], Awaitable[None]]


class QueueWorker:
    """Claims requests in batches and runs each with `handle` as its own task, at most
    `capacity` at once, until stopped; then hands back what it holds."""

    def __init__(
        self,
        pool: Pool,
        worker_id: str,
        capacity: int,
        lease_s: float,
        handle: Handler,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.capacity = capacity
        self.lease_s = lease_s
        self.handle = handle
        self.on_error = on_error or (lambda exc: logger.exception("async worker pass failed"))
        self.wake = asyncio.Event()
        self.held: dict[UUID, Held] = {}
        self._start: GroupCommit[tuple[UUID, UUID], bool] = GroupCommit(self._start_batch)
        self._finish: GroupCommit[aq.Outcome, bool] = GroupCommit(self._finish_batch)

    # -- what a handler calls -------------------------------------------------------------------

    async def start(self, row: AsyncRequestRow) -> bool:
        """The request goes to 'processing'; False when it was cancelled or taken over."""
        return await self._start((row.id, self._token(row)))

    async def finish(
        self,
        row: AsyncRequestRow,
        state: str,
        result: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> bool:
        """'success' with its result or 'failed' with its reason; False when it was cancelled
        or taken over."""
        held = self.held.get(row.id)
        if held is not None:
            held.ending = True
        return await self._finish(aq.Outcome(row.id, self._token(row), state, result, reason))

    async def defer(self, row: AsyncRequestRow, reason: str, delay_s: float) -> bool:
        """Back to the queue, waiting `delay_s` with the reason shown, no attempt spent."""
        held = self.held.get(row.id)
        if held is not None:
            held.ending = True
        return await aq.defer_async_request(self.pool, row.id, self._token(row), reason, delay_s)

    @staticmethod
    def _token(row: AsyncRequestRow) -> UUID:
        assert row.lease_token is not None, "only a claimed request has a lease"
        return row.lease_token

    async def _start_batch(self, items: list[tuple[UUID, UUID]]) -> list[bool]:
        started = await aq.start_async_requests(self.pool, items)
        return [rid in started for rid, _ in items]

    async def _finish_batch(self, items: list[aq.Outcome]) -> list[bool]:
        ended = await aq.finish_async_requests(self.pool, items)
        return [o.id in ended for o in items]

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and process until `stop` is set; then hand back what is held."""
        loop = asyncio.get_running_loop()
        beater = asyncio.create_task(self._heartbeats(), name="async-heartbeats")
        next_reclaim = 0.0
        try:
            while not stop.is_set():
                try:
                    if loop.time() >= next_reclaim:
                        await aq.reclaim_async_requests(self.pool, self.lease_s)
                        next_reclaim = loop.time() + self.lease_s / 2
                    free = self.capacity - len(self.held)
                    if free > 0:
                        for row in await aq.claim_async_requests(self.pool, self.worker_id, free):
                            self._spawn(row)
                except Exception as exc:
                    self.on_error(exc)
                self.wake.clear()
                await _first(stop, self.wake, POLL_S)
            await self._drain()
        finally:
            beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beater

    def _spawn(self, row: AsyncRequestRow) -> None:
        held = Held(row, self._token(row))
        self.held[row.id] = held
        held.task = asyncio.create_task(self._process(held), name=f"async-{row.id}")
        held.task.add_done_callback(lambda _: self._done(row.id))

    def _done(self, request_id: UUID) -> None:
        self.held.pop(request_id, None)
        self.wake.set()  # a slot is free

    async def _process(self, held: Held) -> None:
        """Run one claimed request to its end, or hand it back."""
        row = held.row
        try:
            await self.handle(row)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if held.lost and task is not None and task.uncancel() == 0:
                return  # cancelled by the client or taken over: nothing of ours to write
            # Shutting down: queued again at once, without spending an attempt.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    aq.defer_async_request(
                        self.pool, row.id, held.token, "the control plane stopped", 0
                    )
                )
            raise
        except Exception:
            logger.exception("async request %s failed unexpectedly", row.id)
            with contextlib.suppress(Exception):
                await self.finish(row, "failed", None, "internal error")

    async def _heartbeats(self) -> None:
        """Renew every held lease in one statement; abort the requests whose lease is gone."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            beating = [h for h in self.held.values() if not h.ending]
            if not beating:
                continue
            try:
                kept = await aq.heartbeat_async_requests(
                    self.pool, [(h.row.id, h.token) for h in beating]
                )
            except Exception:
                logger.warning("heartbeat of %d async requests failed; retrying", len(beating))
                continue
            for h in beating:
                if h.row.id not in kept and not h.ending and h.task is not None:
                    h.lost = True
                    h.task.cancel()

    async def _drain(self) -> None:
        tasks = [h.task for h in self.held.values() if h.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_DEADLINE_S)


async def _first(stop: asyncio.Event, wake: asyncio.Event, timeout_s: float) -> None:
    """Wait until stop or wake is set, or `timeout_s` passed."""
    if stop.is_set() or wake.is_set():
        return
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
