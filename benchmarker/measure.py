"""Measure a model in an isolated child: the real instance agent, real generations, peak memory.

The child is started with the same command line and environment as a `process` instance, and
forked from the same kind of zygote where instances are (a forked agent's memory differs from a
fresh process's both ways: SmolLM2 on llama.cpp 620 MB forked, 388 MB fresh; the tiny model 329
MB forked, 393 MB fresh), so the figure is what an instance of the model will reach. Memory is
read after real generations: a memory-mapped model shows ~0.21x its parameter bytes after
loading but ~1.26x once it has generated (`python -m benchmarks.bench_memory`). The peak is the
larger of this process's 20 ms samples of the child's whole process tree and the child's own
kernel high-water mark (`peakRssBytes` on /health).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import wave
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import psutil

from benchmarker import (
    BenchmarkError,
    HandlerFailed,
    LoadFailed,
    NeedsRemoteCode,
    OutOfMemory,
    UnsafeWeights,
)
from benchmarker.estimate import Phase, Profile, cumulative
from instance_agent.client import AgentClient, AgentNotReady, AgentUnreachable
from instance_agent.engines import EngineName
from instance_agent.launch import AgentArgs, free_loopback_port, load_failure, serve_command
from instance_agent.nvml import Nvml
from instance_agent.protocol import HealthReady
from instance_agent.weights import HANDLER_SPEC_FILE
from instance_agent.zygote_client import Zygote, ZygoteChild, ZygoteUnavailable

logger = logging.getLogger(__name__)

CONCURRENCIES = (1, 2, 4)
# Tokens per measured generation. The peak is set by loading, the prompt's prefill and the first
# decoding steps; later tokens add only their KV cells (llama.cpp allocates its whole cache at
# load): SmolLM2 on llama.cpp peaked at the same bytes with 4 tokens as with 24, the tiny model
# within 0.1 MB, at a sixth of the decoding time.
MAX_NEW_TOKENS = 4
# An embedding model is measured on requests of this many texts, a typical client batch.
EMBED_TEXTS = 32
# A speech model transcribes this much audio per measured request (one 30 s Whisper window).
SPEECH_SECONDS = 30
# A chat-sized prompt: long enough that attention and the KV cache are exercised.
PROMPT = (
    "You are a helpful assistant. Explain in a few sentences why the sky is blue, how a "
    "rainbow forms after rain, and what a language model does when it answers a question."
)
SAMPLE_INTERVAL_S = 0.02
# Listing a process tree scans /proc; the tree only changes at start-up, so refresh it rarely.
TREE_REFRESH_S = 0.5
LOAD_TIMEOUT_S = 900.0
RUN_TIMEOUT_S = 600.0
STOP_GRACE_S = 5.0
HEALTH_POLL_S = 0.1
_HTTP_TIMEOUT = aiohttp.ClientTimeout(total=RUN_TIMEOUT_S, connect=5.0)
# An absolute path: a '/' that does not continue a word, so `src/main.py` is left as it is.
_PATH = re.compile(r"(?<![\w.@+,=-])(?:/[\w.@+,=-]+)+/?")


@dataclass(frozen=True)
class Target:
    """What to measure: a catalogued model's files, loaded the way an instance loads them."""

    model: str
    model_dir: Path
    gguf_file: str | None = None
    device: str = "cpu"
    # The interpreter of a handler project's own environment; None: this one.
    python: str | None = None
    # The engine the model's instances generate with (None: the agent picks, as they do).
    engine: EngineName | None = None


def device_kind(device: str) -> str:
    """The profile key of a device: 'cpu' or 'cuda' (all CUDA devices of a host are alike)."""
    return "cuda" if device.startswith("cuda") else device


def agent_env() -> dict[str, str]:
    """The environment a `process` instance gets (kept in step with runtimes/process.py)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def scrub_paths(text: str) -> str:
    """Replace absolute paths by their last component: failure reasons reach API users."""
    return _PATH.sub(lambda m: Path(m.group(0)).name or "/", text)


def classify_exit(
    model: str, returncode: int | None, log_tail: list[str], *, user_code: bool = False
) -> BenchmarkError:
    """Why the agent stopped before serving, as the failure kind a job records.

    With `user_code` (a handler project), the agent's load failure is the user's exception,
    the same on every attempt.
    """
    reason = ""
    for line in reversed(log_tail):
        if (found := load_failure(line)) is not None:
            reason = found
            break
    if user_code and reason:
        return HandlerFailed(f"the handler failed to load: {scrub_paths(reason)[:1000]}")
    text = reason.lower()
    if "pickle" in text:
        return UnsafeWeights()
    if (
        "trust_remote_code" in text
        or "remote code" in text
        or "does not recognize this architecture" in text
    ):
        return NeedsRemoteCode(
            f"Model {model} needs remote code: its architecture is not built into transformers, "
            "and mlcp never runs code shipped with a model"
        )
    if "memoryerror" in text or "out of memory" in text or "cannot allocate memory" in text:
        return OutOfMemory(f"Out of memory while loading {model}")
    if returncode == -signal.SIGKILL:
        # Nobody here sent SIGKILL yet; on Linux that is the kernel's OOM killer.
        return OutOfMemory(f"Out of memory: the process loading {model} was killed by the system")
    if reason:
        return LoadFailed(f"Load error: {scrub_paths(reason)[:400]}")
    return LoadFailed(f"Load error: the instance agent exited with code {returncode}")


class GpuReader:
    """GPU memory used by a set of processes; absent (`open` answers None) without a GPU."""

    def __init__(self, nvml: Nvml) -> None:
        self._nvml = nvml

    @classmethod
    def open(cls) -> GpuReader | None:
        nvml = Nvml.open()
        if nvml is None:
            return None
        if nvml.device_count() == 0:
            nvml.close()
            return None
        return cls(nvml)

    def used_bytes(self, pids: set[int]) -> int | None:
        return self._nvml.used_by(pids)


class TreeSampler:
    """Samples the resident memory of a process and all its descendants on a thread."""

    def __init__(self, pid: int, gpu: GpuReader | None) -> None:
        self._root = psutil.Process(pid)
        self._gpu = gpu
        self._procs: list[psutil.Process] = [self._root]
        self._refreshed = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlcp-bench-sampler", daemon=True)
        self.peak_rss_bytes = 0
        self.peak_gpu_bytes: int | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def sample(self) -> None:
        """Take one reading now."""
        now = time.monotonic()
        if now - self._refreshed >= TREE_REFRESH_S:
            with contextlib.suppress(psutil.Error):
                self._procs = [self._root, *self._root.children(recursive=True)]
            self._refreshed = now
        rss = 0
        for proc in self._procs:
            with contextlib.suppress(psutil.Error):
                rss += int(proc.memory_info().rss)
        gpu = self._gpu.used_bytes({p.pid for p in self._procs}) if self._gpu else None
        with self._lock:
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
            if gpu is not None:
                self.peak_gpu_bytes = max(self.peak_gpu_bytes or 0, gpu)

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.sample()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the worker is killed outright (SIGKILL, OOM),
    # the kernel kills the measuring agent too instead of leaving it serving forever.
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _tail(log: IO[bytes], lines: int = 40) -> list[str]:
    log.seek(0)
    text = log.read().decode("utf-8", "replace")
    return list(deque(text.splitlines(), maxlen=lines))


def _base_command(target: Target, command: list[str] | None) -> list[str] | None:
    """The agent's command: a custom one (tests), the project environment's python, or ours."""
    if command is None and target.python is not None:
        return [target.python, "-m", "instance_agent"]
    return command


class Child:
    """The measuring agent process: started in its own session, stopped with its whole group."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process | ZygoteChild,
        log: IO[bytes],
        base_url: str,
        *,
        user_code: bool = False,
    ) -> None:
        self.proc = proc
        self.log = log
        self.base_url = base_url
        self.user_code = user_code

    @classmethod
    async def start(
        cls,
        target: Target,
        concurrency: int,
        command: list[str] | None,
        zygote: Zygote | None = None,
    ) -> Child:
        """Start the agent: forked from `zygote` (as the process runtime starts instances) when
        there is one and the agent is ours, else a fresh process."""
        port = free_loopback_port()
        args = AgentArgs(
            model_dir=target.model_dir,
            model_name=target.model,
            port=port,
            concurrency=concurrency,
            max_queue=concurrency,
            device=target.device,
            gguf_file=target.gguf_file,
            engine=target.engine,
        )
        user_code = (target.model_dir / HANDLER_SPEC_FILE).is_file()
        base_url = f"http://127.0.0.1:{port}"
        base = _base_command(target, command)
        if zygote is not None and base is None:
            named = tempfile.NamedTemporaryFile(prefix="mlcp-measure-", suffix=".log")
            try:
                forked = await zygote.spawn(
                    serve_command(args, []), agent_env(), Path(named.name), die_with_zygote=True
                )
            except ZygoteUnavailable as exc:
                named.close()
                logger.warning("agent zygote: %s; measuring in a fresh process", exc)
            else:
                return cls(forked, named, base_url, user_code=user_code)
        log = tempfile.TemporaryFile()
        try:
            proc = await asyncio.create_subprocess_exec(
                *serve_command(args, base),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=agent_env(),
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except OSError as exc:
            log.close()
            raise LoadFailed(
                f"Load error: could not start the instance agent ({exc.strerror})"
            ) from exc
        return cls(proc, log, base_url, user_code=user_code)

    @property
    def gone(self) -> bool:
        """Whether the agent has exited (or its zygote has, which took it along)."""
        if isinstance(self.proc, ZygoteChild) and self.proc.orphaned:
            return True
        return self.proc.returncode is not None

    def failure(self, model: str) -> BenchmarkError:
        if isinstance(self.proc, ZygoteChild) and self.proc.orphaned:
            return LoadFailed("Load error: the agent zygote exited while measuring")
        return classify_exit(model, self.proc.returncode, _tail(self.log), user_code=self.user_code)

    async def stop(self) -> None:
        """SIGTERM the group, wait, then SIGKILL; the log is closed afterwards."""
        try:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), STOP_GRACE_S)
                except TimeoutError:
                    pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), STOP_GRACE_S)
        finally:
            self.log.close()


async def _wait_ready(http: aiohttp.ClientSession, child: Child, model: str) -> HealthReady:
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        if child.gone:
            raise child.failure(model)
        with contextlib.suppress(AgentUnreachable, AgentNotReady):
            return await AgentClient(http, 5.0).health(child.base_url)
        await asyncio.sleep(HEALTH_POLL_S)
    raise LoadFailed(f"Load error: {model} did not load within {LOAD_TIMEOUT_S:.0f} s")


async def _health(http: aiohttp.ClientSession, child: Child) -> HealthReady:
    return await AgentClient(http, 30.0).health(child.base_url)


def _speech_sample(seconds: int = SPEECH_SECONDS, rate: int = 16_000) -> bytes:
    """A WAV file of a tone: what a speech model is measured transcribing."""
    frames = b"".join(
        int(8000 * math.sin(2 * math.pi * 440 * i / rate)).to_bytes(2, "little", signed=True)
        for i in range(seconds * rate)
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


async def _generate(
    http: aiohttp.ClientSession,
    child: Child,
    model: str,
    n: int,
    *,
    embeds: bool = False,
    speech: bool = False,
) -> int:
    """One request as users send it: a generation, for an embedding model a batch of texts,
    for a speech model a transcription of SPEECH_SECONDS of audio.

    Returns the tokens it produced (generated, or for embeddings read; 0 for speech).
    """
    path = "/embed" if embeds else "/transcribe" if speech else "/run"
    body: dict[str, Any] = (
        {"input": [f"{PROMPT} ({n}.{i})" for i in range(EMBED_TEXTS)]}
        if embeds
        else {"prompt": f"{PROMPT} ({n})", "params": {"max_new_tokens": MAX_NEW_TOKENS}}
    )
    send: dict[str, Any] = {"data": _speech_sample()} if speech else {"json": body}
    try:
        async with http.post(child.base_url + path, **send) as resp:
            payload: dict[str, Any] = await resp.json(content_type=None)
            if resp.status != 200:
                await asyncio.sleep(0.2)  # let a dying agent finish exiting, to say why
                if child.gone:
                    raise child.failure(model)
                code = payload.get("code", resp.status) if isinstance(payload, dict) else ""
                raise LoadFailed(f"Load error: generation failed ({code})")
            if speech:
                return 0
            return int(payload.get("prompt_tokens" if embeds else "tokens_generated", 0))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        await asyncio.sleep(0.2)
        if child.gone:
            raise child.failure(model) from exc
        raise LoadFailed(f"Load error: generation failed ({type(exc).__name__})") from exc


def _reported_peak(health: HealthReady) -> tuple[int, int | None]:
    memory = health["memory"]
    rss = memory.get("peakRssBytes")
    gpu = memory.get("peakGpuBytes")
    return (int(rss) if isinstance(rss, int) else 0, int(gpu) if isinstance(gpu, int) else None)


async def measure(
    target: Target,
    *,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
    command: list[str] | None = None,
    zygote: Zygote | None = None,
) -> Profile:
    """Load `target` in one agent, generate at each concurrency in turn, return the profile.

    One child serves every concurrency (started at the largest): the phases run one after
    another in it, as an instance's load grows. With `zygote` the child is forked from it, as
    the process runtime starts instances: a forked agent's memory is not a fresh process's
    (shared libraries are resident only where touched, the zygote's imports are inherited).
    `command` replaces `python -m instance_agent` as instances do (Settings.agent_command).
    Raises a `BenchmarkError` subclass saying why the model cannot run. Cancelling stops the
    child (and its whole process group) before the cancellation propagates.
    """
    clock = time.monotonic()
    timings: list[str] = []

    def lap(what: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings.append(f"{what} {now - clock:.2f} s")
        clock = now

    child = await Child.start(target, max(concurrencies), command, zygote)
    lap("start" + (" (forked)" if isinstance(child.proc, ZygoteChild) else ""))
    sampler = TreeSampler(child.proc.pid, GpuReader.open())
    sampler.start()
    try:
        async with aiohttp.ClientSession(timeout=_HTTP_TIMEOUT) as http:
            ready = await _wait_ready(http, child, target.model)
            lap("load")
            sampler.sample()
            loaded_rss = max(sampler.peak_rss_bytes, _reported_peak(ready)[0])
            embeds = ready.get("task") == "feature-extraction"
            # A handler project's calls are its own code's business (and a gRPC-only one has
            # no JSON call at all): it is measured loaded, as its instance starts.
            calls = ready.get("task") != "handler"
            speech = ready.get("task") == "automatic-speech-recognition"
            phases: list[Phase] = []
            for concurrency in sorted(concurrencies):
                started = time.monotonic()
                tokens = await asyncio.gather(
                    *(
                        _generate(http, child, target.model, i, embeds=embeds, speech=speech)
                        for i in range(concurrency if calls else 0)
                    )
                )
                seconds = time.monotonic() - started
                sampler.sample()
                reported_rss, reported_gpu = _reported_peak(await _health(http, child))
                gpu_peaks = [g for g in (sampler.peak_gpu_bytes, reported_gpu) if g is not None]
                phases.append(
                    Phase(
                        concurrency=concurrency,
                        peak_rss_bytes=max(sampler.peak_rss_bytes, reported_rss),
                        peak_gpu_bytes=max(gpu_peaks) if gpu_peaks else None,
                        tokens=sum(tokens),
                        seconds=seconds,
                    )
                )
                lap(f"concurrency {concurrency}")
            load_s = float(ready.get("loadSeconds") or 0.0)
    finally:
        sampler.stop()
        await asyncio.shield(child.stop())
        lap("stop")
        logger.info("measuring %s: %s", target.model, ", ".join(timings))
    logger.info(
        "measured %s: %.0f MB at concurrency 1, load %.1f s",
        target.model,
        phases[0].peak_rss_bytes / 1e6,
        load_s,
    )
    return Profile(device_kind(target.device), load_s, loaded_rss, cumulative(phases))
