"""Admission and batching with a fake engine that records each batch it is given."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from instance_agent.batcher import SHUTDOWN_MESSAGE, Batcher
from instance_agent.protocol import GenerationParams, InstanceBusy
from instance_agent.streaming import Event, Failed, Finished, Row, TextChunk


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def send(self, event: Event) -> None:
        self.events.append(event)


class FakeEngine:
    """Feeds every row the token 'x' until it is done; can hold a batch open on a gate."""

    def __init__(self) -> None:
        self.batches: list[list[Row]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = False

    def generate(self, rows: Sequence[Row], should_abort: Callable[[], bool]) -> None:
        self.batches.append(list(rows))
        self.started.set()
        for row in rows:
            row.start(lambda ids: "x" * len(ids))
        if self.fail:
            raise RuntimeError("secret /path in a message")
        while not self.gate.wait(0.01):
            if should_abort() or all(row.cancelled for row in rows):
                return
        while not all(row.done for row in rows):
            if should_abort():
                return
            for row in rows:
                row.feed(ord("x"), is_eos=False)


def make_row(params: GenerationParams | None = None, tokens: int = 2) -> tuple[Row, Recorder]:
    recorder = Recorder()
    row = Row([1], params or GenerationParams(), tokens, recorder)  # type: ignore[arg-type]
    return row, recorder


def wait_until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


def submit(batcher: Batcher, row: Row) -> None:
    batcher.reserve()
    batcher.submit(row)


def test_waiting_rows_run_together_in_the_next_batch(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=4, max_queue=4)
    engine.gate.clear()
    blocker, _ = make_row()
    submit(batcher, blocker)
    batcher.start()
    try:
        assert engine.started.wait(2)
        rows = [make_row() for _ in range(4)]
        for row, _ in rows:
            submit(batcher, row)
        assert batcher.load().in_flight == 1
        assert batcher.load().queued == 4
        engine.gate.set()
        wait_until(lambda: all(row.done for row, _ in rows))
        assert [len(batch) for batch in engine.batches] == [1, 4]
        load = batcher.load()
        assert (load.batches, load.max_batch_size, load.requests) == (2, 4, 5)
        for _, recorder in rows:
            texts, finished = recorder.events[:-1], recorder.events[-1]
            assert texts == [TextChunk("x"), TextChunk("x")]
            assert isinstance(finished, Finished)
            assert finished.tokens_generated == 2
    finally:
        batcher.stop()


def test_rows_with_different_sampling_settings_run_apart(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=4, max_queue=4)
    greedy = [make_row()[0] for _ in range(2)]
    sampled = [make_row(GenerationParams(do_sample=True, temperature=0.5))[0] for _ in range(2)]
    for row in (greedy[0], sampled[0], greedy[1], sampled[1]):
        submit(batcher, row)
    batcher.start()
    try:
        wait_until(lambda: all(row.done for row in greedy + sampled))
        assert [set(map(id, b)) for b in engine.batches] == [
            set(map(id, greedy)),
            set(map(id, sampled)),
        ]
    finally:
        batcher.stop()


def test_a_full_queue_refuses_at_once(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=1, max_queue=1)
    submit(batcher, make_row()[0])
    submit(batcher, make_row()[0])
    started = time.monotonic()
    with pytest.raises(InstanceBusy):
        batcher.reserve()
    assert time.monotonic() - started < 0.1
    batcher.stop()


def test_a_reservation_given_back_frees_its_place(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=1, max_queue=0)
    batcher.reserve()
    with pytest.raises(InstanceBusy):
        batcher.reserve()
    batcher.unreserve()
    batcher.reserve()


def test_a_cancelled_waiting_row_leaves_the_queue(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=1, max_queue=1)
    row, recorder = make_row()
    submit(batcher, row)
    batcher.cancel(row)
    assert batcher.load().queued == 0
    assert row.done
    assert recorder.events == []


def test_a_cancelled_running_row_frees_the_batch(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=1, max_queue=0)
    engine.gate.clear()
    row, recorder = make_row(tokens=1000)
    submit(batcher, row)
    batcher.start()
    try:
        assert engine.started.wait(2)
        assert batcher.load().in_flight == 1
        batcher.cancel(row)
        wait_until(lambda: batcher.load().in_flight == 0)
        assert recorder.events == []
    finally:
        batcher.stop()


def test_an_engine_failure_fails_the_batch_without_details(engine: FakeEngine) -> None:
    engine.fail = True
    batcher = Batcher(engine, concurrency=2, max_queue=0)
    rows = [make_row() for _ in range(2)]
    for row, _ in rows:
        submit(batcher, row)
    batcher.start()
    try:
        wait_until(lambda: all(row.done for row, _ in rows))
        for _, recorder in rows:
            assert recorder.events == [Failed("generation failed")]
    finally:
        batcher.stop()


def test_stopping_aborts_running_and_fails_waiting_rows(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=1, max_queue=1)
    engine.gate.clear()
    running, running_events = make_row(tokens=1000)
    waiting, waiting_events = make_row()
    submit(batcher, running)
    batcher.start()
    assert engine.started.wait(2)
    submit(batcher, waiting)
    started = time.monotonic()
    batcher.stop(timeout_s=2)
    assert time.monotonic() - started < 1
    assert running_events.events == [Failed(SHUTDOWN_MESSAGE)]
    assert waiting_events.events == [Failed(SHUTDOWN_MESSAGE)]
    with pytest.raises(InstanceBusy):
        batcher.reserve()


def test_requests_sent_together_share_a_batch_despite_arriving_apart(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=3, max_queue=0, batch_quiet_s=0.1, batch_max_wait_s=1)
    batcher.start()
    try:
        rows = [make_row()[0] for _ in range(3)]
        for row in rows:
            submit(batcher, row)
            time.sleep(0.02)
        wait_until(lambda: all(row.done for row in rows))
        assert [len(batch) for batch in engine.batches] == [3]
    finally:
        batcher.stop()


def test_a_lone_request_waits_only_for_the_quiet_period(engine: FakeEngine) -> None:
    batcher = Batcher(engine, concurrency=8, max_queue=0, batch_quiet_s=0.05, batch_max_wait_s=1)
    batcher.start()
    try:
        row, _ = make_row()
        started = time.monotonic()
        submit(batcher, row)
        assert engine.started.wait(2)
        assert 0.04 < time.monotonic() - started < 0.5
    finally:
        batcher.stop()


def test_a_steady_trickle_waits_no_longer_than_the_maximum(engine: FakeEngine) -> None:
    batcher = Batcher(
        engine, concurrency=100, max_queue=0, batch_quiet_s=0.05, batch_max_wait_s=0.2
    )
    batcher.start()
    try:
        started = time.monotonic()
        while not engine.started.is_set():
            assert time.monotonic() - started < 1
            submit(batcher, make_row()[0])
            time.sleep(0.01)
        assert 0.15 < time.monotonic() - started < 0.5
    finally:
        batcher.stop()
