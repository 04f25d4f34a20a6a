"""Wire protocol validation: each bad input gets a clear 4xx error; good ones come back typed."""

from __future__ import annotations

import math
from typing import Any

import pytest

from instance_agent.protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    AgentError,
    GenerationFailed,
    GenerationParams,
    InstanceBusy,
    InvalidJson,
    InvalidParams,
    InvalidPrompt,
    ModelLoading,
    PayloadTooLarge,
    ProtocolError,
    UnsupportedMediaType,
    validate_params,
    validate_prompt,
    validate_run_body,
)

# (params, a fragment the message must hold)
BAD_PARAMS: list[tuple[Any, str]] = [
    ([], "params must be an object"),
    ("max_new_tokens=3", "params must be an object"),
    (7, "params must be an object"),
    ({"max_tokens": 5, "max_new_tokens": 5}, "not both"),
    ({"max_tokens": 0}, "max_tokens must be between 1 and 1024"),
    ({"max_tokens": "5"}, "max_tokens must be an integer, not a string"),
    ({"seed": -1}, "seed must be between 0"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"num_beams": 2}, "'num_beams'"),
    ({"": 1}, "unknown parameter ''"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, not a boolean"),
    ({"max_new_tokens": False}, "not a boolean"),
    ({"max_new_tokens": 0}, "between 1 and 1024"),
    ({"max_new_tokens": -5}, "between 1 and 1024"),
    ({"max_new_tokens": 1025}, "between 1 and 1024"),
    ({"max_new_tokens": 10.5}, "must be an integer, not a number"),
    ({"max_new_tokens": "10"}, "must be an integer, not a string"),
    ({"max_new_tokens": None}, "must be an integer, not null"),
    ({"max_new_tokens": [10]}, "must be an integer, not a list"),
    ({"max_length": 0}, "max_length must be between 1"),
    ({"max_length": "100"}, "max_length must be an integer"),
    ({"min_length": -1}, "min_length must be between 0 and 1024"),
    ({"min_length": 1025}, "min_length must be between 0 and 1024"),
    ({"min_length": True}, "not a boolean"),
    ({"temperature": -1.0}, "temperature must be at least 0"),
    ({"temperature": -0.01}, "temperature must be at least 0"),
    ({"temperature": 5.01}, "at most 5"),
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": -math.inf}, "temperature must be a finite number"),
    ({"temperature": "0.7"}, "temperature must be a number, not a string"),
    ({"temperature": True}, "temperature must be a number, not a boolean"),
    ({"top_p": 0}, "top_p must be above 0"),
    ({"top_p": 1.5}, "at most 1"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"top_k": -1}, "top_k must be between 0 and 1000"),
    ({"top_k": 1001}, "top_k must be between 0 and 1000"),
    ({"top_k": 5.5}, "top_k must be an integer"),
    ({"do_sample": 1}, "do_sample must be a boolean, not an integer"),
    ({"do_sample": "true"}, "do_sample must be a boolean, not a string"),
    ({"do_sample": None}, "do_sample must be a boolean, not null"),
    ({"repetition_penalty": 0}, "repetition_penalty must be above 0"),
    ({"repetition_penalty": 10.5}, "at most 10"),
    ({"repetition_penalty": math.inf}, "finite"),
    ({"stop": 3}, "stop must be a string or a list of strings"),
    ({"stop": {"a": 1}}, "stop must be a string or a list of strings"),
    ({"stop": ""}, "1 to 64 characters"),
    ({"stop": ["ok", ""]}, "1 to 64 characters"),
    ({"stop": ["x" * 65]}, "1 to 64 characters"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 strings"),
    ({"stop": ["a", 1]}, "each stop string must be a string, not an integer"),
    ({"stop": [None]}, "not null"),
]


@pytest.mark.parametrize(("params", "fragment"), BAD_PARAMS)
def test_bad_params_are_refused_with_a_clear_message(params: Any, fragment: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        validate_params(params)
    assert fragment in caught.value.message
    assert caught.value.status_code == 422
    assert caught.value.code == "invalid_params"
    assert isinstance(caught.value, ValueError)


def test_there_are_at_least_thirty_bad_cases() -> None:
    assert len(BAD_PARAMS) + len(BAD_PROMPTS) >= 30


def test_an_unknown_key_is_named_even_beside_good_ones() -> None:
    with pytest.raises(InvalidParams, match="'beams'"):
        validate_params({"max_new_tokens": 5, "beams": 2})


def test_the_cap_is_configurable() -> None:
    assert validate_params({"max_new_tokens": 2000}, max_new_tokens_cap=4096).max_new_tokens == 2000
    with pytest.raises(InvalidParams, match="between 1 and 16"):
        validate_params({"max_new_tokens": 17}, max_new_tokens_cap=16)


GOOD_PARAMS: list[tuple[Any, GenerationParams]] = [
    (None, GenerationParams()),
    ({}, GenerationParams()),
    ({"max_new_tokens": 1}, GenerationParams(max_new_tokens=1)),
    ({"max_new_tokens": 1024}, GenerationParams(max_new_tokens=1024)),
    ({"max_length": 300}, GenerationParams(max_length=300)),
    ({"min_length": 0}, GenerationParams()),
    ({"temperature": 1}, GenerationParams(temperature=1.0)),
    ({"temperature": 5}, GenerationParams(temperature=5.0)),
    ({"temperature": 1e-6}, GenerationParams(temperature=1e-6)),
    ({"top_p": 1}, GenerationParams(top_p=1.0)),
    ({"top_k": 0}, GenerationParams(top_k=0)),
    ({"do_sample": True}, GenerationParams(do_sample=True)),
    ({"repetition_penalty": 1.3}, GenerationParams(repetition_penalty=1.3)),
    ({"stop": "\n"}, GenerationParams(stop=("\n",))),
    ({"stop": ["a", "b", "c", "d"]}, GenerationParams(stop=("a", "b", "c", "d"))),
    ({"stop": []}, GenerationParams()),
    # Temperature 0 is greedy (OpenAI, Ollama), even beside do_sample.
    ({"temperature": 0}, GenerationParams()),
    ({"temperature": 0.0, "do_sample": True}, GenerationParams()),
    ({"max_tokens": 7}, GenerationParams(max_new_tokens=7)),
    ({"seed": 42}, GenerationParams(seed=42)),
]


@pytest.mark.parametrize(("params", "expected"), GOOD_PARAMS)
def test_good_params_come_back_typed(params: Any, expected: GenerationParams) -> None:
    assert validate_params(params) == expected


def test_ints_are_accepted_as_floats_and_stored_as_floats() -> None:
    params = validate_params({"temperature": 2, "repetition_penalty": 1})
    assert isinstance(params.temperature, float)
    assert isinstance(params.repetition_penalty, float)


BAD_PROMPTS: list[tuple[Any, str]] = [
    (None, "not null"),
    (5, "not an integer"),
    ({"role": "user", "content": "hi"}, "not an object"),
    ("", "1 to 200000 characters"),
    ("x" * (MAX_PROMPT_CHARS + 1), "1 to 200000 characters"),
    ([], "1 to 256 messages"),
    ([{"role": "user", "content": "hi"}] * 257, "1 to 256 messages"),
    (["hi"], "prompt[0] must be an object"),
    ([{"role": "robot", "content": "hi"}], "prompt[0].role must be one of"),
    ([{"content": "hi"}], "prompt[0].role must be one of"),
    ([{"role": "user"}], "prompt[0].content must be a string, not null"),
    ([{"role": "user", "content": 3}], "prompt[0].content must be a string"),
    ([{"role": "user", "content": "a", "name": "x"}], "unknown field 'name'"),
    (
        [{"role": "user", "content": "ok"}, {"role": "user", "content": ["no"]}],
        "prompt[1].content",
    ),
    (
        [{"role": "user", "content": "x" * 150_000}, {"role": "user", "content": "x" * 60_000}],
        "at most 200000 characters",
    ),
]


@pytest.mark.parametrize(("prompt", "fragment"), BAD_PROMPTS)
def test_bad_prompts_are_refused(prompt: Any, fragment: str) -> None:
    with pytest.raises(InvalidPrompt) as caught:
        validate_prompt(prompt)
    assert fragment in caught.value.message
    assert caught.value.code == "invalid_prompt"
    assert caught.value.status_code == 422


def test_good_prompts_come_back() -> None:
    assert validate_prompt("hello") == "hello"
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert validate_prompt(messages) == messages


BAD_BODIES: list[tuple[Any, type[ProtocolError], str]] = [
    ([], InvalidJson, "must be a JSON object, not a list"),
    ("text", InvalidJson, "must be a JSON object, not a string"),
    ({}, InvalidPrompt, "needs a prompt"),
    ({"params": {}}, InvalidPrompt, "needs a prompt"),
    ({"prompt": "hi", "stream": True}, InvalidParams, "unknown field 'stream'"),
    ({"prompt": "hi", "params": {"max_new_tokens": 0}}, InvalidParams, "max_new_tokens"),
    ({"prompt": 1, "params": {}}, InvalidPrompt, "prompt must be a string"),
]


@pytest.mark.parametrize(("body", "error", "fragment"), BAD_BODIES)
def test_bad_bodies(body: Any, error: type[ProtocolError], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        validate_run_body(body)


def test_a_good_body() -> None:
    request = validate_run_body({"prompt": "hi", "params": {"max_new_tokens": 3}})
    assert request.prompt == "hi"
    assert request.params == GenerationParams(max_new_tokens=3)
    assert validate_run_body({"prompt": "hi"}).params == GenerationParams()


@pytest.mark.parametrize(
    ("params", "prompt_tokens", "expected"),
    [
        (GenerationParams(), 10, DEFAULT_MAX_NEW_TOKENS),
        (GenerationParams(max_new_tokens=5), 10, 5),
        (GenerationParams(max_length=30), 10, 20),
        (GenerationParams(max_new_tokens=5, max_length=30), 10, 5),
        (GenerationParams(max_new_tokens=50, max_length=30), 10, 20),
        (GenerationParams(max_new_tokens=90), 200, 56),  # the context (256) wins
        (GenerationParams(max_length=5000), 10, 100),  # the cap (100) wins
        (GenerationParams(), 250, 6),
    ],
)
def test_new_tokens_for_takes_the_smallest_limit(
    params: GenerationParams, prompt_tokens: int, expected: int
) -> None:
    assert params.new_tokens_for(prompt_tokens, context_tokens=256, cap=100) == expected


def test_a_prompt_filling_the_context_is_refused_with_the_limit_in_tokens() -> None:
    with pytest.raises(InvalidPrompt, match="context is 256 tokens") as caught:
        GenerationParams().new_tokens_for(256, context_tokens=256, cap=100)
    assert "at most 255 tokens" in caught.value.message


def test_max_length_below_the_prompt_is_refused() -> None:
    with pytest.raises(InvalidParams, match="max_length 10 leaves no room"):
        GenerationParams(max_length=10).new_tokens_for(10, context_tokens=256, cap=100)


def test_sampling_key_ignores_sampling_knobs_when_greedy() -> None:
    greedy_a = GenerationParams(temperature=0.5, top_k=3)
    greedy_b = GenerationParams(temperature=2.0, top_p=0.5)
    assert greedy_a.sampling_key == greedy_b.sampling_key
    sampled_a = GenerationParams(do_sample=True, temperature=0.5)
    sampled_b = GenerationParams(do_sample=True, temperature=0.7)
    assert sampled_a.sampling_key != sampled_b.sampling_key
    assert GenerationParams(max_new_tokens=3, stop=("x",)).sampling_key == (
        GenerationParams().sampling_key
    )


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidJson, 400, "invalid_json"),
        (PayloadTooLarge, 413, "payload_too_large"),
        (UnsupportedMediaType, 415, "unsupported_media_type"),
        (InvalidParams, 422, "invalid_params"),
        (InvalidPrompt, 422, "invalid_prompt"),
        (ModelLoading, 503, "loading"),
        (InstanceBusy, 503, "instance_busy"),
        (GenerationFailed, 503, "generation_failed"),
    ],
)
def test_errors_carry_status_code_and_envelope(
    error: type[AgentError], status: int, code: str
) -> None:
    instance = error()
    assert instance.status_code == status
    assert instance.body() == {"error": instance.message, "code": code}
    assert instance.message  # the docstring is the default message


def test_busy_and_loading_ask_to_retry_after_a_second() -> None:
    assert InstanceBusy.retry_after_s == 1
    assert ModelLoading.retry_after_s == 1
