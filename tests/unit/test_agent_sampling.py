"""Token choice for the llama.cpp engine, and which engine serves a model (both pure)."""

from __future__ import annotations

import numpy as np
import pytest

from instance_agent.engines import EngineUnavailable, choose_engine, parse_engine
from instance_agent.protocol import GenerationParams
from instance_agent.sampling import choose_token


def logits(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def pick(values: np.ndarray, params: GenerationParams, seen=(), banned=None, seed=0) -> int:
    chosen = choose_token(values.copy(), params, seen, banned, np.random.default_rng(seed))
    return chosen


def test_greedy_takes_the_best_and_ignores_the_sampling_knobs() -> None:
    params = GenerationParams(temperature=3.0, top_k=1, top_p=0.1)
    assert pick(logits(0.1, 2.0, 1.0), params) == 1


def test_the_repetition_penalty_divides_positive_and_multiplies_negative_scores() -> None:
    params = GenerationParams(repetition_penalty=2.0)
    # 3.0 seen becomes 1.5, below the unseen 2.0.
    assert pick(logits(3.0, 2.0, -1.0), params, seen=[0]) == 1
    # -0.5 seen becomes -1.0, below the unseen -0.8.
    assert pick(logits(-0.5, -0.8, -3.0), params, seen=[0, 0]) == 1


def test_banned_ids_are_never_chosen() -> None:
    banned = np.array([1], dtype=np.int64)
    assert pick(logits(0.0, 9.0, 1.0), GenerationParams(), banned=banned) == 2
    sampled = GenerationParams(do_sample=True, top_k=0)
    picks = {pick(logits(0.0, 9.0, 1.0), sampled, banned=banned, seed=s) for s in range(50)}
    assert 1 not in picks


def test_top_k_one_and_a_tiny_top_p_sample_only_the_best() -> None:
    values = logits(1.0, 1.2, 0.9, 1.1)
    for params in (
        GenerationParams(do_sample=True, top_k=1),
        GenerationParams(do_sample=True, top_k=0, top_p=0.01),
    ):
        assert {pick(values, params, seed=s) for s in range(30)} == {1}


def test_top_k_keeps_exactly_k_tokens() -> None:
    values = logits(5.0, 4.9, 4.8, -1.0, -2.0)
    params = GenerationParams(do_sample=True, top_k=2, temperature=5.0)
    assert {pick(values, params, seed=s) for s in range(200)} == {0, 1}


def test_top_p_keeps_tokens_until_their_mass_reaches_p() -> None:
    # Probabilities 0.5, 0.3, 0.2: top_p 0.6 needs the first two, and never the third.
    values = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    params = GenerationParams(do_sample=True, top_k=0, top_p=0.6)
    assert {pick(values, params, seed=s) for s in range(200)} == {0, 1}


def test_a_seed_repeats_its_choices_and_a_high_temperature_spreads_them() -> None:
    values = logits(*([0.0] * 50))
    params = GenerationParams(do_sample=True, top_k=0, temperature=2.0)
    first = [pick(values, params, seed=7) for _ in range(5)]
    assert first == [pick(values, params, seed=7) for _ in range(5)]
    assert len({pick(values, params, seed=s) for s in range(40)}) > 10


@pytest.mark.parametrize(
    ("requested", "gguf", "available", "chosen"),
    [
        (None, True, True, "llama.cpp"),
        (None, True, False, "transformers"),
        (None, False, True, "transformers"),
        ("transformers", True, True, "transformers"),
        ("llama.cpp", True, True, "llama.cpp"),
    ],
)
def test_gguf_goes_to_llama_cpp_where_installed(
    requested: str | None, gguf: bool, available: bool, chosen: str
) -> None:
    engine = choose_engine(parse_engine(requested), gguf=gguf, llama_available=available)
    assert engine == chosen


@pytest.mark.parametrize(
    ("gguf", "available", "reason"),
    [(False, True, "GGUF files only"), (True, False, "not installed")],
)
def test_llama_cpp_is_refused_where_it_cannot_serve(
    gguf: bool, available: bool, reason: str
) -> None:
    with pytest.raises(EngineUnavailable, match=reason):
        choose_engine("llama.cpp", gguf=gguf, llama_available=available)


@pytest.mark.parametrize("value", ["vllm", "", 1, "Llama.cpp"])
def test_unknown_engine_names_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"engine must be one of transformers, llama\.cpp"):
        parse_engine(value)
