"""Embeddings: the /embed wire format and the batcher that joins concurrent requests.

`POST /embed {"input": "text" | ["text", ...]}` answers
`{"embeddings": [[...], ...], "prompt_tokens": n, "dimensions": d}`. Requests that arrive
together are encoded in shared forward passes: one pass over 32 texts costs far less than 32
passes over one (see `benchmarks/bench_embeddings.py`). Standard library only, so the control
plane validates bodies with the same function before proxying them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

from instance_agent.batcher import BATCH_MAX_WAIT_S, BATCH_QUIET_S, SHUTDOWN_MESSAGE, Load
from instance_agent.protocol import (
    GenerationFailed,
    InstanceBusy,
    InvalidJson,
    InvalidParams,
    InvalidPrompt,
)

logger = logging.getLogger(__name__)

FIELD_INPUT = "input"
# OpenAI's own limit on inputs per request.
MAX_EMBED_INPUTS = 2048
MAX_EMBED_CHARS = 100_000


class EmbedResponse(TypedDict):
    embeddings: list[list[float]]
    prompt_tokens: int
    dimensions: int


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if value is None:
        return "null"
    return type(value).__name__


def validate_embed_input(value: object) -> list[str]:
    """Check an embeddings `input`: a string or a list of 1 to 2048 non-empty strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidPrompt(f"input must be a string or a list of strings, not {_kind(value)}")
    if not 1 <= len(items) <= MAX_EMBED_INPUTS:
        raise InvalidPrompt(f"input must hold 1 to {MAX_EMBED_INPUTS} strings, not {len(items)}")
    for index, item in enumerate(items):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise InvalidPrompt("token arrays are not supported as input; send the text")
        if not isinstance(item, str):
            raise InvalidPrompt(f"input[{index}] must be a string, not {_kind(item)}")
        if not 1 <= len(item) <= MAX_EMBED_CHARS:
            raise InvalidPrompt(
                f"input[{index}] must be 1 to {MAX_EMBED_CHARS} characters long, not {len(item)}"
            )
    return list(items)


def validate_embed_body(body: object) -> list[str]:
    """Check a parsed /embed body: `{"input": ...}`."""
    if not isinstance(body, dict):
        raise InvalidJson("the request body must be a JSON object")
    for key in body:
        if key != FIELD_INPUT:
            raise InvalidParams(f"unknown field {key!r} in the body; allowed: input")
    if FIELD_INPUT not in body:
        raise InvalidPrompt("the body needs an input")
    return validate_embed_input(body[FIELD_INPUT])


class Encoder(Protocol):
    """Embeds texts (see `encoder.EncoderEngine`)."""

    def embed(self, texts: Sequence[str]) -> EmbeddingsLike: ...


class EmbeddingsLike(Protocol):
    @property
    def vectors(self) -> list[list[float]]: ...

    @property
    def token_counts(self) -> list[int]: ...


@dataclass
class _Job:
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[tuple[list[list[float]], int]]
    cancelled: bool = False
    done: bool = field(default=False)

    def resolve(self, vectors: list[list[float]], tokens: int) -> None:
        self.done = True
        self.loop.call_soon_threadsafe(_set_result, self.future, (vectors, tokens))

    def fail(self, message: str) -> None:
        self.done = True
        self.loop.call_soon_threadsafe(_set_exception, self.future, GenerationFailed(message))


def _set_result(
    future: asyncio.Future[tuple[list[list[float]], int]], value: tuple[list[list[float]], int]
) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(
    future: asyncio.Future[tuple[list[list[float]], int]], error: BaseException
) -> None:
    if not future.done():
        future.set_exception(error)


class EmbeddingBatcher:
    """Admits embedding requests and encodes up to `concurrency` of them together, on one thread.

    Admission matches the generation batcher: `concurrency + max_queue` unfinished requests at
    most, refused at once beyond that (503 + Retry-After).
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        concurrency: int,
        max_queue: int,
        batch_quiet_s: float = BATCH_QUIET_S,
        batch_max_wait_s: float = BATCH_MAX_WAIT_S,
    ) -> None:
        self._encoder = encoder
        self._concurrency = concurrency
        self._queue_length = max_queue
        self._quiet_s = batch_quiet_s
        self._max_wait_s = batch_max_wait_s
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._pending: deque[_Job] = deque()
        self._running = 0
        self._first_pending_at = 0.0
        self._last_arrival_at = 0.0
        self._stopping = False
        self._batches = 0
        self._max_batch_size = 0
        self._requests = 0
        self._thread = threading.Thread(target=self._work, name="mlcp-embedding", daemon=True)

    @property
    def concurrency(self) -> int:
        return self._concurrency

    def start(self) -> None:
        """Start the encoding thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Fail the waiting requests and wait for the thread."""
        with self._wakeup:
            self._stopping = True
            waiting = list(self._pending)
            self._pending.clear()
            self._wakeup.notify_all()
        for job in waiting:
            job.fail(SHUTDOWN_MESSAGE)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def reconfigure(self, concurrency: int) -> None:
        """Encode up to `concurrency` requests together from now on."""
        with self._lock:
            self._concurrency = concurrency
            self._wakeup.notify_all()

    def load(self) -> Load:
        """Report in-flight and queued requests and what batching has done so far."""
        with self._lock:
            return Load(
                in_flight=self._running,
                queued=len(self._pending),
                batches=self._batches,
                max_batch_size=self._max_batch_size,
                requests=self._requests,
            )

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Embed texts with whatever else arrives meanwhile; return the vectors and token count."""
        loop = asyncio.get_running_loop()
        job = _Job(texts, loop, loop.create_future())
        with self._wakeup:
            capacity = self._concurrency + self._queue_length
            if self._stopping or self._running + len(self._pending) >= capacity:
                raise InstanceBusy()
            self._last_arrival_at = time.monotonic()
            if not self._pending:
                self._first_pending_at = self._last_arrival_at
            self._pending.append(job)
            self._wakeup.notify()
        try:
            return await job.future
        finally:
            if not job.done:
                job.cancelled = True
                with self._lock:
                    if job in self._pending:
                        self._pending.remove(job)

    def _take_batch(self) -> list[_Job]:
        latest = self._first_pending_at + self._max_wait_s
        while not self._stopping and len(self._pending) < self._concurrency:
            remaining = min(latest, self._last_arrival_at + self._quiet_s) - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.wait(remaining)
        batch = [self._pending.popleft() for _ in range(min(self._concurrency, len(self._pending)))]
        self._first_pending_at = time.monotonic()
        return batch

    def _work(self) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                batch = [job for job in self._take_batch() if not job.cancelled]
                if not batch:
                    continue
                self._running = len(batch)
                self._batches += 1
                self._requests += len(batch)
                self._max_batch_size = max(self._max_batch_size, len(batch))
            try:
                result = self._encoder.embed([text for job in batch for text in job.texts])
            except Exception:
                logger.exception("embedding failed for a batch of %d", len(batch))
                for job in batch:
                    job.fail("embedding failed")
            else:
                offset = 0
                for job in batch:
                    end = offset + len(job.texts)
                    job.resolve(result.vectors[offset:end], sum(result.token_counts[offset:end]))
                    offset = end
            finally:
                with self._lock:
                    self._running = 0
