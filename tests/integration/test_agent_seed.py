"""The agent run alone is the single-model HTTP server (POST /chat, GET /health), and serves
embeddings for an encoder: real agents in subprocesses, tiny models built in-process.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agent_process import AgentProcess
from tests.tiny_model import build_tiny_encoder, build_tiny_model

# The single-model server's exact field lists.
HEALTH_FIELDS = {"status", "model", "model_loaded", "note"}
CHAT_FIELDS = {"prompt", "response", "tokens_generated", "time_seconds", "tokens_per_second"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seed-models")


@pytest.fixture(scope="module")
def chat_agent(models: Path) -> Iterator[AgentProcess]:
    """The agent started as the seed starts its server: a model dir and a port, nothing else."""
    process = AgentProcess(build_tiny_model(models / "Tiny-Chat-1M"), model_name=None)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def encoder_agent(models: Path) -> Iterator[AgentProcess]:
    process = AgentProcess(
        build_tiny_encoder(models / "tiny-encoder"), "--concurrency", "8", "--max-queue", "8"
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def post(
    http: aiohttp.ClientSession, agent: AgentProcess, path: str, body: Any
) -> tuple[int, Any]:
    async with http.post(f"{agent.url}{path}", json=body) as reply:
        return reply.status, await reply.json()


def test_health_has_the_seed_fields_and_names_the_model_dir(chat_agent: AgentProcess) -> None:
    status, health = chat_agent.health()
    assert status == 200
    assert HEALTH_FIELDS <= set(health)
    assert health["status"] == "healthy"
    assert health["model"] == "Tiny-Chat-1M"
    assert health["model_loaded"] is True
    assert health["note"] == "Model is loaded in memory for fast inference"
    loading = [body for code, body in chat_agent.health_seen if code == 503]
    assert all(set(body) == HEALTH_FIELDS and body["model_loaded"] is False for body in loading)


async def test_chat_answers_with_exactly_the_seed_fields(
    chat_agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    status, body = await post(http, chat_agent, "/chat", {"prompt": "What is machine learning?"})
    assert status == 200, body
    assert set(body) == CHAT_FIELDS
    assert body["prompt"] == "What is machine learning?"
    assert isinstance(body["response"], str)
    assert 1 <= body["tokens_generated"] <= 128
    assert body["time_seconds"] > 0
    expected_speed = body["tokens_generated"] / body["time_seconds"]
    assert body["tokens_per_second"] == pytest.approx(expected_speed, rel=0.05)


async def test_chat_is_greedy_by_default_and_honours_max_tokens(
    chat_agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    request = {"prompt": "Once upon a time", "max_tokens": 6}
    first = await post(http, chat_agent, "/chat", request)
    again = await post(http, chat_agent, "/chat", {**request, "temperature": 0.0})
    assert first[0] == again[0] == 200
    assert first[1]["response"] == again[1]["response"]
    assert first[1]["tokens_generated"] <= 6
    # The same text as the agent protocol's greedy /run.
    status, run = await post(
        http, chat_agent, "/run", {"prompt": "Once upon a time", "params": {"max_tokens": 6}}
    )
    assert status == 200 and run["output"] == first[1]["response"]
    status, sampled = await post(http, chat_agent, "/chat", {**request, "temperature": 0.7})
    assert status == 200 and set(sampled) == CHAT_FIELDS


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({}, "prompt is required"),
        ({"prompt": ""}, "non-empty string"),
        ({"prompt": 5}, "non-empty string"),
        ({"prompt": "hi", "max_tokens": 0}, "between 1 and 2048"),
        ({"prompt": "hi", "max_tokens": 2049}, "between 1 and 2048"),
        ({"prompt": "hi", "max_tokens": "5"}, "must be an integer"),
        ({"prompt": "hi", "max_tokens": True}, "must be an integer"),
        ({"prompt": "hi", "temperature": 2.5}, "between 0.0 and 2.0"),
        ({"prompt": "hi", "temperature": -0.1}, "between 0.0 and 2.0"),
        ({"prompt": "hi", "temperature": "hot"}, "must be a number"),
        ({"prompt": "hi", "top_k": 3}, "unknown field 'top_k'"),
        (["hi"], "JSON object"),
    ],
)
async def test_bad_chat_requests_get_400_and_only_an_error(
    chat_agent: AgentProcess, http: aiohttp.ClientSession, body: Any, fragment: str
) -> None:
    status, answer = await post(http, chat_agent, "/chat", body)
    assert status == 400
    assert set(answer) == {"error"}
    assert fragment in answer["error"]


async def test_chat_with_broken_json_gets_400(
    chat_agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    headers = {"content-type": "application/json"}
    url = f"{chat_agent.url}/chat"
    async with http.post(url, data=io.BytesIO(b"{nope"), headers=headers) as reply:
        assert reply.status == 400
        assert set(await reply.json()) == {"error"}


async def test_temperature_zero_and_max_tokens_work_on_run(
    chat_agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    params = {"temperature": 0, "max_tokens": 5, "min_length": 5}
    status, body = await post(http, chat_agent, "/run", {"prompt": "Hello", "params": params})
    assert status == 200, body
    assert body["tokens_generated"] == 5


async def test_a_generator_refuses_embeddings_and_the_reverse(
    chat_agent: AgentProcess, encoder_agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    status, body = await post(http, chat_agent, "/embed", {"input": "hi"})
    assert (status, body["code"]) == (422, "wrong_task")
    status, body = await post(http, encoder_agent, "/run", {"prompt": "hi"})
    assert (status, body["code"]) == (422, "wrong_task")
    status, body = await post(http, encoder_agent, "/chat", {"prompt": "hi"})
    assert status == 400 and set(body) == {"error"}


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


async def test_embeddings_are_normalised_and_batched_alike(
    encoder_agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    status, health = encoder_agent.health()
    assert status == 200 and health["task"] == "feature-extraction"
    texts = ["the quick brown fox", "hello world", "paris is the capital of france"]
    status, body = await post(http, encoder_agent, "/embed", {"input": texts})
    assert status == 200, body
    assert set(body) == {"embeddings", "prompt_tokens", "dimensions"}
    assert len(body["embeddings"]) == 3 and body["dimensions"] == 32
    assert all(norm(v) == pytest.approx(1.0, abs=1e-5) for v in body["embeddings"])
    assert body["prompt_tokens"] > len(texts)
    # Concurrent single requests share passes and get the same vectors as one batched request.
    answers = await asyncio.gather(
        *(post(http, encoder_agent, "/embed", {"input": text}) for text in texts)
    )
    for (code, one), batched in zip(answers, body["embeddings"], strict=True):
        assert code == 200
        assert one["embeddings"][0] == pytest.approx(batched, abs=1e-5)
    async with http.get(f"{encoder_agent.url}/health") as reply:
        stats = (await reply.json())["stats"]
    assert stats["maxBatchSize"] >= 2


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"input": []}, 422, "invalid_prompt"),
        ({"input": [""]}, 422, "invalid_prompt"),
        ({"input": 5}, 422, "invalid_prompt"),
        ({"input": [1, 2, 3]}, 422, "invalid_prompt"),
        ({"input": ["a"] * 2049}, 422, "invalid_prompt"),
        ({"input": "a", "model": "x"}, 422, "invalid_params"),
        ({}, 422, "invalid_prompt"),
        ("text", 400, "invalid_json"),
    ],
)
async def test_bad_embedding_requests_get_clear_errors(
    encoder_agent: AgentProcess,
    http: aiohttp.ClientSession,
    body: Any,
    status: int,
    code: str,
) -> None:
    got, answer = await post(http, encoder_agent, "/embed", body)
    assert (got, answer["code"]) == (status, code), answer
