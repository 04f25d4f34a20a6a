"""The model engine in-process with the tiny GPT-2: tokenizing, batching and loader safety."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from instance_agent.model import TransformersEngine, convert_gguf, load_engine
from instance_agent.protocol import GenerationParams, InvalidPrompt, LoadFailed
from instance_agent.streaming import Event, Failed, Finished, Row, TextChunk
from tests.tiny_model import (
    CONTEXT_TOKENS,
    REMOTE_CODE_MARKER,
    build_pickle_only_model,
    build_remote_code_model,
    build_tiny_model,
)


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


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-models")


@pytest.fixture(scope="module")
def tiny_dir(models_root: Path) -> Path:
    return build_tiny_model(models_root / "tiny")


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> TransformersEngine:
    return load_engine(tiny_dir)


def generate(
    engine: TransformersEngine, prompts: Sequence[str], params: GenerationParams
) -> list[Recorder]:
    recorders = [Recorder() for _ in prompts]
    rows = []
    for prompt, recorder in zip(prompts, recorders, strict=True):
        ids = engine.encode(prompt)
        budget = params.new_tokens_for(len(ids), context_tokens=engine.context_tokens, cap=1024)
        rows.append(Row(ids, params, budget, recorder))  # type: ignore[arg-type]
    engine.generate(rows, lambda: False)
    return recorders


def test_the_engine_reports_its_context_and_device(engine: TransformersEngine) -> None:
    assert engine.context_tokens == CONTEXT_TOKENS
    assert engine.device == "cpu"


def test_greedy_rows_of_different_lengths_match_their_solo_runs(engine: TransformersEngine) -> None:
    params = GenerationParams(max_new_tokens=16, min_length=16)
    prompts = ["Hello", "The quick brown fox jumps over the lazy dog", "Paris is"]
    batched = generate(engine, prompts, params)
    for prompt, together in zip(prompts, batched, strict=True):
        (alone,) = generate(engine, [prompt], params)
        assert together.text == alone.text
        assert together.finished.tokens_generated == 16


def test_rows_finish_at_their_own_budgets(engine: TransformersEngine) -> None:
    recorders = []
    rows = []
    for budget in (3, 9):
        recorder = Recorder()
        params = GenerationParams(max_new_tokens=budget, min_length=budget)
        rows.append(Row(engine.encode("Hello"), params, budget, recorder))  # type: ignore[arg-type]
        recorders.append(recorder)
    engine.generate(rows, lambda: False)
    assert [r.finished.tokens_generated for r in recorders] == [3, 9]
    assert recorders[1].text.startswith(recorders[0].text)


def test_an_abort_ends_the_batch(engine: TransformersEngine) -> None:
    recorder = Recorder()
    params = GenerationParams(max_new_tokens=200, min_length=200)
    row = Row(engine.encode("Hello"), params, 200, recorder)  # type: ignore[arg-type]
    engine.generate([row], lambda: True)
    assert row.tokens_generated == 0
    assert not any(isinstance(e, Failed | Finished) for e in recorder.events)


def test_chat_messages_use_the_template(engine: TransformersEngine) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    assert engine.encode(messages) == engine.encode("<|user|>Hello\n<|assistant|>", raw=True)
    # A plain string is one user message unless raw.
    assert engine.encode("Hello") == engine.encode(messages)
    assert engine.encode("Hello", raw=True) != engine.encode(messages)


def test_a_model_without_a_chat_template_refuses_messages(models_root: Path) -> None:
    plain = load_engine(build_tiny_model(models_root / "no-template", chat_template=False))
    assert plain.encode("Hello")
    with pytest.raises(InvalidPrompt, match="no chat template"):
        plain.encode([{"role": "user", "content": "Hello"}])


def test_pickle_only_weights_are_refused(models_root: Path) -> None:
    with pytest.raises(LoadFailed, match="only pickle weights"):
        load_engine(build_pickle_only_model(models_root / "pickle"))


def test_a_missing_directory_is_refused(models_root: Path) -> None:
    with pytest.raises(LoadFailed, match="does not exist"):
        load_engine(models_root / "absent")


def test_remote_code_never_runs(models_root: Path) -> None:
    model_dir = build_remote_code_model(models_root / "remote")
    try:
        loaded = load_engine(model_dir)
    except LoadFailed:
        pass
    else:
        assert loaded.encode("Hello")
    assert not (model_dir / REMOTE_CODE_MARKER).exists()


def test_converting_a_missing_gguf_fails_cleanly(models_root: Path) -> None:
    with pytest.raises(LoadFailed, match="does not exist"):
        convert_gguf(models_root / "absent.gguf", models_root / "converted")
    assert not (models_root / "converted").exists()


@pytest.mark.parametrize("device", ["tpu", "meta"])
def test_an_unusable_device_is_refused(tiny_dir: Path, device: str) -> None:
    with pytest.raises(LoadFailed, match="device"):
        load_engine(tiny_dir, device=device)


def test_cuda_without_a_gpu_is_refused(tiny_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LoadFailed, match="CUDA is not available"):
        load_engine(tiny_dir, device="cuda")
