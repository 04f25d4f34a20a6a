"""Incremental decoding, stop strings and a row's events, with a byte-level fake tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from instance_agent.protocol import GenerationParams
from instance_agent.streaming import (
    Event,
    Failed,
    Finished,
    IncrementalDecoder,
    Row,
    StopFilter,
    TextChunk,
)

EOS = 256


def byte_decode(ids: Sequence[int]) -> str:
    """Decode ids as raw bytes, the way a byte-level BPE renders a partial character."""
    return bytes(i for i in ids if i != EOS).decode("utf-8", errors="replace")


def byte_ids(text: str) -> list[int]:
    return list(text.encode())


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def send(self, event: Event) -> None:
        self.events.append(event)

    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextChunk))


@pytest.mark.parametrize("text", ["plain ascii", "café naïve", "日本語テキスト", "emoji 🎉 end"])
def test_incremental_decoding_never_splits_a_character(text: str) -> None:
    decoder = IncrementalDecoder(byte_decode)
    pieces = [decoder.push(i) for i in byte_ids(text)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_truncated_character_is_flushed_as_a_replacement() -> None:
    decoder = IncrementalDecoder(byte_decode)
    ids = byte_ids("ok é")[:-1]
    text = "".join(decoder.push(i) for i in ids)
    assert text == "ok "
    assert decoder.flush() == "\ufffd"


@pytest.mark.parametrize(
    ("stops", "pieces", "expected", "stopped"),
    [
        ((), ["a", "b"], "ab", False),
        (("END",), ["hello ", "E", "N", "D", " more"], "hello ", True),
        (("END",), ["hello ", "EN", "X"], "hello ENX", False),
        (("\n\n",), ["line\n", "\nnext"], "line", True),
        (("ab", "b"), ["xab"], "x", True),
        (("abc",), ["ab", "ab", "c"], "ab", True),
    ],
)
def test_stop_filter(
    stops: tuple[str, ...], pieces: list[str], expected: str, stopped: bool
) -> None:
    stop_filter = StopFilter(stops)
    out = ""
    hit = False
    for piece in pieces:
        text, hit = stop_filter.push(piece)
        out += text
        if hit:
            break
    if not hit:
        out += stop_filter.flush()
    assert (out, hit) == (expected, stopped)


def test_stop_filter_holds_back_a_possible_start_of_a_stop_string() -> None:
    stop_filter = StopFilter(["STOP"])
    assert stop_filter.push("go ST") == ("go ", False)
    assert stop_filter.push("ay") == ("STay", False)


def make_row(params: GenerationParams, max_new_tokens: int = 100) -> tuple[Row, Recorder]:
    recorder = Recorder()
    row = Row([1, 2, 3], params, max_new_tokens, recorder)  # type: ignore[arg-type]
    row.start(byte_decode, now=10.0)
    return row, recorder


def test_a_row_ends_at_its_own_budget() -> None:
    row, recorder = make_row(GenerationParams(), max_new_tokens=3)
    done = [row.feed(i, is_eos=False, now=11.0) for i in byte_ids("abcdef")]
    assert done == [False, False, True, True, True, True]
    assert recorder.text() == "abc"
    assert recorder.events[-1] == Finished(3, 1.0, prompt_tokens=3, finish_reason="length")


def test_a_row_ends_at_eos_without_counting_it() -> None:
    row, recorder = make_row(GenerationParams())
    for i in byte_ids("hi"):
        row.feed(i, is_eos=False, now=12.0)
    assert row.feed(EOS, is_eos=True, now=12.0)
    assert recorder.text() == "hi"
    assert recorder.events[-1] == Finished(2, 2.0, prompt_tokens=3, finish_reason="stop")
    assert Finished(2, 2.0).tokens_per_second == 1.0


def test_a_row_trims_its_stop_string() -> None:
    row, recorder = make_row(GenerationParams(stop=("\n",)))
    results = [row.feed(i, is_eos=False) for i in byte_ids("one line\nsecond")]
    assert results.index(True) == len("one line")
    assert recorder.text() == "one line"
    last = recorder.events[-1]
    assert isinstance(last, Finished) and last.finish_reason == "stop"


def test_a_row_ended_with_its_batch_ran_out_of_length() -> None:
    row, recorder = make_row(GenerationParams())
    row.feed(ord("a"), is_eos=False)
    row.finish(now=10.5)
    assert recorder.events[-1] == Finished(1, 0.5, prompt_tokens=3, finish_reason="length")


def test_a_cancelled_row_stops_silently() -> None:
    row, recorder = make_row(GenerationParams())
    row.feed(ord("a"), is_eos=False)
    row.cancelled = True
    assert row.feed(ord("b"), is_eos=False)
    row.finish()
    assert recorder.events == [TextChunk("a")]


def test_a_failed_row_reports_once() -> None:
    row, recorder = make_row(GenerationParams())
    row.fail("boom")
    row.fail("again")
    row.finish()
    assert recorder.events == [Failed("boom")]


def test_finishing_a_row_releases_held_back_text() -> None:
    row, recorder = make_row(GenerationParams(stop=("xyz",)))
    for i in byte_ids("abx"):
        row.feed(i, is_eos=False)
    assert recorder.text() == "ab"
    row.finish()
    assert recorder.text() == "abx"


def test_min_new_tokens_never_exceeds_the_budget() -> None:
    row, _ = make_row(GenerationParams(min_length=50), max_new_tokens=10)
    assert row.min_new_tokens == 10
