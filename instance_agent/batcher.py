"""Admission and batching: which requests run together, on the one generation thread.

Requests are admitted while fewer than `concurrency + max_queue` are unfinished, and refused at
once otherwise (ollama's scheduler does the same). One worker thread takes the oldest pending
request plus up to `concurrency - 1` others with the same sampling settings and runs them as one
batch; requests that arrive meanwhile wait for the next batch. Batching is the point: on a 2-core
box SmolLM2 gave 11.3 tokens/s for one prompt and 37.6 for eight at once
(`python -m benchmarks.bench_batching`).

An engine that can take rows into a running batch (`joins_running_batch`, the llama.cpp engine)
gets a `take_more` callable instead: between its decoding steps it takes waiting requests, in
order and whatever their sampling settings, while fewer than `concurrency` rows are live, so a
request that arrives while others generate starts at the next step rather than after them all.
Such a batch runs until no row is live; `batches` then counts those runs and `maxBatchSize` the
most rows live at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from instance_agent.protocol import InstanceBusy
from instance_agent.streaming import Row

logger = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the instance is shutting down"
# Requests sent "at once" reach the queue milliseconds apart (HTTP parsing, tokenizing), more on a
# busy host. A batch that started without them makes them wait for its whole generation: with 8
# clients, the first batch held 1 request and the second 7. So a batch waits until no request has
# arrived for BATCH_QUIET_S, at most BATCH_MAX_WAIT_S after the first; both cost less than one
# decoding step of SmolLM2 on 2 cores (~90 ms).
BATCH_QUIET_S = 0.02
BATCH_MAX_WAIT_S = 0.08


# Called by a joining engine between decoding steps with `claim`, which sets a row up in the
# engine and answers True, or answers False when the row does not fit (its KV cache is full);
# hands over the waiting rows it claimed, oldest first, never more than `concurrency` live.
TakeMore = Callable[[Callable[[Row], bool]], list[Row]]


class Engine(Protocol):
    """Runs one batch to the end, feeding every row its tokens (see `model.TransformersEngine`)."""

    def generate(self, rows: Sequence[Row], should_abort: Callable[[], bool]) -> None: ...


@runtime_checkable
class JoiningEngine(Protocol):
    """Runs a batch that waiting rows join between its steps (see `llama_engine.LlamaEngine`)."""

    joins_running_batch: bool

    def generate(
        self,
        rows: Sequence[Row],
        should_abort: Callable[[], bool],
        take_more: TakeMore | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class Load:
    """How busy the batcher is right now."""

    in_flight: int
    queued: int
    batches: int
    max_batch_size: int
    requests: int


class Batcher:
    """Admits requests, groups compatible ones into batches and runs them on one thread."""

    def __init__(
        self,
        engine: Engine | JoiningEngine,
        *,
        concurrency: int,
        max_queue: int,
        batch_quiet_s: float = BATCH_QUIET_S,
        batch_max_wait_s: float = BATCH_MAX_WAIT_S,
    ) -> None:
        self._engine = engine
        self._joining = (
            engine if isinstance(engine, JoiningEngine) and engine.joins_running_batch else None
        )
        self._batch_quiet_s = batch_quiet_s
        self._batch_max_wait_s = batch_max_wait_s
        self._concurrency = concurrency
        self._capacity = concurrency + max_queue
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._reserved = 0
        self._pending: deque[Row] = deque()
        self._first_pending_at = 0.0
        self._last_arrival_at = 0.0
        self._running: list[Row] = []
        self._stopping = False
        self._batches = 0
        self._max_batch_size = 0
        self._requests = 0
        self._thread = threading.Thread(target=self._work, name="mlcp-generation", daemon=True)

    def start(self) -> None:
        """Start the generation thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Abort the running batch, fail the waiting requests and wait for the thread."""
        with self._wakeup:
            self._stopping = True
            waiting = list(self._pending)
            self._pending.clear()
            self._wakeup.notify_all()
        for row in waiting:
            row.fail(SHUTDOWN_MESSAGE)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def reserve(self) -> None:
        """Claim a place for a request about to be submitted, or raise `InstanceBusy`."""
        with self._lock:
            if self._stopping or self._unfinished() >= self._capacity:
                raise InstanceBusy()
            self._reserved += 1

    def unreserve(self) -> None:
        """Give back a place claimed by `reserve` for a request that will not be submitted."""
        with self._lock:
            self._reserved -= 1

    @property
    def concurrency(self) -> int:
        return self._concurrency

    def reconfigure(self, concurrency: int) -> None:
        """Serve up to `concurrency` at once from now on; the queue length stays as it was."""
        with self._lock:
            queue = self._capacity - self._concurrency
            self._concurrency = concurrency
            self._capacity = concurrency + queue
            self._wakeup.notify_all()

    def submit(self, row: Row) -> None:
        """Queue a row for the next batch, turning its reservation into a queued request."""
        with self._wakeup:
            self._reserved -= 1
            if self._stopping:
                row.fail(SHUTDOWN_MESSAGE)
                return
            self._last_arrival_at = time.monotonic()
            if not self._pending:
                self._first_pending_at = self._last_arrival_at
            self._pending.append(row)
            self._wakeup.notify()

    def cancel(self, row: Row) -> None:
        """Forget a row whose client went away: unqueue it, or drop it from its batch."""
        row.cancelled = True
        with self._lock:
            if row in self._pending:
                self._pending.remove(row)
                row.drop()

    def load(self) -> Load:
        """Report in-flight and queued requests and what batching has done so far."""
        with self._lock:
            in_flight = sum(1 for row in self._running if not row.done)
            return Load(
                in_flight=in_flight,
                queued=self._reserved + len(self._pending),
                batches=self._batches,
                max_batch_size=self._max_batch_size,
                requests=self._requests,
            )

    def _unfinished(self) -> int:
        running = sum(1 for row in self._running if not row.done)
        return self._reserved + len(self._pending) + running

    def _wait_for_company(self) -> None:
        """Give requests sent together a moment to join one batch (call holding the lock)."""
        latest = self._first_pending_at + self._batch_max_wait_s
        while not self._stopping and len(self._pending) < self._concurrency:
            deadline = min(latest, self._last_arrival_at + self._batch_quiet_s)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.wait(remaining)

    def _take_batch(self) -> list[Row]:
        head = self._pending.popleft()
        batch = [head]
        for row in list(self._pending):
            if len(batch) >= self._concurrency:
                break
            if row.params.sampling_key == head.params.sampling_key:
                self._pending.remove(row)
                batch.append(row)
        return batch

    def _take_more(self, claim: Callable[[Row], bool]) -> list[Row]:
        """Hand a joining engine the oldest waiting rows it can claim (see `TakeMore`)."""
        with self._lock:
            self._running = [row for row in self._running if not row.done]
            taken: list[Row] = []
            while (
                not self._stopping
                and self._pending
                and len(self._running) < self._concurrency
                and claim(self._pending[0])
            ):
                row = self._pending.popleft()
                self._running.append(row)
                taken.append(row)
            if taken:
                self._requests += len(taken)
                self._max_batch_size = max(self._max_batch_size, len(self._running))
            return taken

    def _work_joining(self, engine: JoiningEngine) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                self._batches += 1
            try:
                engine.generate([], self._should_abort, self._take_more)
            except Exception:
                with self._lock:
                    batch = list(self._running)
                logger.exception("generation failed for a batch of %d", len(batch))
                for row in batch:
                    row.fail("generation failed")
            finally:
                with self._lock:
                    batch, self._running = self._running, []
                for row in batch:
                    if self._stopping:
                        row.fail(SHUTDOWN_MESSAGE)
                    else:
                        row.finish()

    def _work(self) -> None:
        if self._joining is not None:
            self._work_joining(self._joining)
            return
        while True:
            with self._wakeup:
                while not self._pending and not self._stopping:
                    self._wakeup.wait()
                self._wait_for_company()
                if self._stopping:
                    return
                if not self._pending:
                    continue
                batch = self._take_batch()
                if self._pending:
                    self._first_pending_at = time.monotonic()
                self._running = batch
                self._batches += 1
                self._requests += len(batch)
                self._max_batch_size = max(self._max_batch_size, len(batch))
            try:
                self._engine.generate(batch, self._should_abort)
            except Exception:
                logger.exception("generation failed for a batch of %d", len(batch))
                for row in batch:
                    row.fail("generation failed")
            finally:
                for row in batch:
                    if self._stopping:
                        row.fail(SHUTDOWN_MESSAGE)
                    else:
                        row.finish()
                with self._lock:
                    self._running = []

    def _should_abort(self) -> bool:
        return self._stopping
