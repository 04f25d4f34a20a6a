"""One request's place in a batch: token ids in, text chunks out to the waiting coroutine.

The generation thread calls `Row.feed` once per decoding step; the request's coroutine reads the
resulting events from its `EventChannel`. Nothing here imports torch, so it is tested directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from instance_agent.protocol import FinishReason, GenerationParams

logger = logging.getLogger(__name__)

Decode = Callable[[Sequence[int]], str]

_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class TextChunk:
    text: str


@dataclass(frozen=True)
class Finished:
    tokens_generated: int
    time_seconds: float
    prompt_tokens: int = 0
    # "stop": an end token or a stop string; "length": the token budget or the context ran out.
    finish_reason: FinishReason = "length"

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.time_seconds if self.time_seconds > 0 else 0.0


@dataclass(frozen=True)
class Failed:
    message: str


Event = TextChunk | Finished | Failed


class EventChannel:
    """Carries events from the generation thread to one request's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def send(self, event: Event) -> None:
        """Hand an event to the coroutine; safe to call from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            # The event loop closed during shutdown; nobody is left to read the event.
            pass

    async def receive(self) -> Event:
        """Wait for the next event."""
        return await self._queue.get()


class IncrementalDecoder:
    """Turns token ids into text as they come, never splitting a character or a word piece.

    Decoding each new id alone breaks byte-level pieces of a multi-byte character and drops the
    space some tokenizers only render after a neighbour, so it decodes a short window and emits
    what the newest id added (the approach of text-generation-inference's `decode_token`).
    """

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completed, possibly empty."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character renders as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopFilter:
    """Cuts text at the first stop string, holding back any tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return the text that is safe to emit, and whether a stop string was reached."""
        if not self._stops:
            return text, False
        buffer = self._held + text
        hits = [index for index in (buffer.find(stop) for stop in self._stops) if index >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        held = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - held :] if held else ""
        return buffer[: len(buffer) - held], False

    def flush(self) -> str:
        """Release the held-back tail: the output ended before any stop string completed."""
        held, self._held = self._held, ""
        return held

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class Row:
    """One request in a batch: its prompt ids, its limits, and the channel its text goes to."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        max_new_tokens: int,
        channel: EventChannel,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.channel = channel
        # Set by the request's coroutine when its client goes away; read by the generation thread.
        self.cancelled = False
        self.done = False
        self.tokens_generated = 0
        self._started_at = 0.0
        self._decoder: IncrementalDecoder | None = None
        self._stop_filter = StopFilter(params.stop)

    @property
    def min_new_tokens(self) -> int:
        return min(self.params.min_length, self.max_new_tokens)

    def start(self, decode: Decode, now: float | None = None) -> None:
        """Mark the start of generation for this row."""
        self._decoder = IncrementalDecoder(decode)
        self._started_at = time.monotonic() if now is None else now

    def feed(self, token_id: int, *, is_eos: bool, now: float | None = None) -> bool:
        """Take this row's next token; return True once the row needs no more tokens."""
        if self.done:
            return True
        if self.cancelled:
            self.done = True
            return True
        if is_eos:
            self._finish(now, reason="stop")
            return True
        assert self._decoder is not None, "start() must come before feed()"
        self.tokens_generated += 1
        text, stopped = self._stop_filter.push(self._decoder.push(token_id))
        if text:
            self.channel.send(TextChunk(text))
        if stopped or self.tokens_generated >= self.max_new_tokens:
            self._finish(now, stopped=stopped, reason="stop" if stopped else "length")
            return True
        return False

    def finish(self, now: float | None = None) -> None:
        """End the row now (the batch ended), flushing any held-back text."""
        if not self.done:
            self._finish(now)

    def fail(self, message: str) -> None:
        """End the row with an error event."""
        if not self.done:
            self.done = True
            self.channel.send(Failed(message))

    def drop(self) -> None:
        """End the row silently: its client is gone."""
        self.done = True

    def _finish(
        self, now: float | None, *, stopped: bool = False, reason: FinishReason = "length"
    ) -> None:
        self.done = True
        if self.cancelled:
            return
        if not stopped and self._decoder is not None:
            tail, stopped = self._stop_filter.push(self._decoder.flush())
            if stopped:
                reason = "stop"
            tail = tail if stopped else tail + self._stop_filter.flush()
            if tail:
                self.channel.send(TextChunk(tail))
        end = time.monotonic() if now is None else now
        self.channel.send(
            Finished(
                self.tokens_generated,
                max(0.0, end - self._started_at),
                prompt_tokens=len(self.prompt_ids),
                finish_reason=reason,
            )
        )
