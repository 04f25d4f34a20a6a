"""The agent fork server behind the process runtime: real zygote, real forked agents, tiny model.

Behaviour only: a forked instance answers as a fresh process does (same greedy text), a child
crash leaves the zygote serving, each child's own exit is reported (and nothing of it is left
open in the zygote), a dead zygote is replaced (its running instances still found),
and every child takes its thread count from its own environment, not the zygote's.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from control_plane.runtimes.base import InstanceSpec, Launched
from control_plane.runtimes.process import ProcessRuntime
from instance_agent.zygote_client import Zygote
from tests.agent_process import AgentProcess
from tests.tiny_model import build_tiny_model

PROMPT = {"prompt": "The quick brown fox", "params": {"max_new_tokens": 12}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("zygote-models") / "tiny")


@pytest.fixture(scope="module")
async def runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProcessRuntime]:
    """One runtime (and zygote) for the module: importing torch costs seconds."""
    rt = ProcessRuntime(tmp_path_factory.mktemp("zygote-logs"), cluster="zygote-test")
    assert rt.zygote is not None
    await rt.zygote.ensure_started()
    try:
        yield rt
    finally:
        for listed in await rt.list():
            await rt.stop(listed.handle, 5)
        await rt.close()


def spec(model_dir: Path, instance_id: int) -> InstanceSpec:
    return InstanceSpec(instance_id, 1, "tiny", model_dir, None, 1, 4)


async def wait_healthy(endpoint: str, timeout_s: float = 60) -> None:
    async with aiohttp.ClientSession() as session:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                async with session.get(endpoint + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{endpoint} not healthy within {timeout_s} s")
            await asyncio.sleep(0.05)


async def run(endpoint: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(endpoint + "/run", json=PROMPT) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            return body


async def started(runtime: ProcessRuntime, model_dir: Path, instance_id: int) -> Launched:
    launched = await runtime.start(spec(model_dir, instance_id))
    await wait_healthy(launched.endpoint)
    return launched


def gone(pid: int) -> bool:
    """No such process, or only a zombie left for its new parent (an orphan's) to reap."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def zygote_pid(runtime: ProcessRuntime) -> int:
    assert runtime.zygote is not None and runtime.zygote.pid is not None
    return runtime.zygote.pid


async def test_a_forked_instance_answers_like_a_fresh_process(
    runtime: ProcessRuntime, tiny: Path
) -> None:
    fresh = AgentProcess(tiny)
    try:
        fresh.wait_ready()
        expected = await run(fresh.url)
    finally:
        fresh.stop()
    launched = await started(runtime, tiny, 1)
    # Forked, not started afresh: the instance is the zygote's child.
    assert psutil.Process(int(launched.handle)).ppid() == zygote_pid(runtime)
    got = await run(launched.endpoint)
    assert got["output"] == expected["output"]
    assert got["tokens_generated"] == expected["tokens_generated"] == 12
    await runtime.stop(launched.handle, 5)
    assert gone(int(launched.handle))


async def test_the_zygote_survives_a_child_crash(runtime: ProcessRuntime, tiny: Path) -> None:
    before = zygote_pid(runtime)
    crashed = await started(runtime, tiny, 2)
    os.kill(int(crashed.handle), signal.SIGKILL)
    for _ in range(200):
        exited = await runtime.exited(crashed.handle)
        if exited is not None:
            break
        await asyncio.sleep(0.05)
    assert exited is not None and exited.reason == "instance process was killed by SIGKILL"
    assert zygote_pid(runtime) == before
    again = await started(runtime, tiny, 3)
    assert (await run(again.endpoint))["tokens_generated"] == 12
    assert psutil.Process(int(again.handle)).ppid() == before
    await runtime.stop(again.handle, 5)


async def test_each_childs_own_exit_is_reported_and_its_watch_is_closed(
    runtime: ProcessRuntime, tiny: Path
) -> None:
    zygote = psutil.Process(zygote_pid(runtime))
    fds_before = zygote.num_fds()
    first = await started(runtime, tiny, 4)
    second = await started(runtime, tiny, 5)
    os.kill(int(second.handle), signal.SIGKILL)
    os.kill(int(first.handle), signal.SIGINT)
    reasons: dict[str, str] = {}
    for _ in range(200):
        for launched in (first, second):
            if launched.handle not in reasons:
                exited = await runtime.exited(launched.handle)
                if exited is not None:
                    reasons[launched.handle] = exited.reason
        if len(reasons) == 2:
            break
        await asyncio.sleep(0.05)
    assert reasons[second.handle] == "instance process was killed by SIGKILL"
    assert "SIGKILL" not in reasons[first.handle]
    # Every child's exit watch (its pidfd) and connection are closed once it is reported.
    assert zygote.num_fds() <= fds_before


async def test_a_dead_zygote_is_replaced_and_its_instances_still_found(
    runtime: ProcessRuntime, tiny: Path
) -> None:
    survivor = await started(runtime, tiny, 4)
    old = zygote_pid(runtime)
    os.kill(old, signal.SIGKILL)
    await until(lambda: gone(old))
    # The running instance outlives its zygote, and the runtime still knows it.
    assert (await run(survivor.endpoint))["tokens_generated"] == 12
    assert await runtime.exited(survivor.handle) is None
    assert survivor.handle in {listed.handle for listed in await runtime.list()}
    replacement = await started(runtime, tiny, 5)
    assert zygote_pid(runtime) != old
    assert psutil.Process(int(replacement.handle)).ppid() == zygote_pid(runtime)
    for launched in (survivor, replacement):
        await runtime.stop(launched.handle, 5)
        assert await runtime.exited(launched.handle) is not None
        assert gone(int(launched.handle))


async def test_each_child_takes_its_own_thread_settings(tmp_path: Path, tiny: Path) -> None:
    # The zygote imported torch with 2 threads requested; its children ask for 1 and 2.
    zygote = Zygote(tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "2"}, tmp_path / "z.log")
    try:
        for wanted in ("1", "2", "1"):
            log = tmp_path / f"child-{wanted}-{os.urandom(4).hex()}.log"
            argv = ["serve", "--model-dir", str(tiny), "--port", "0", "--host", "127.0.0.1"]
            child = await zygote.spawn(argv, {**os.environ, "OMP_NUM_THREADS": wanted}, log)
            try:
                threads = await _reported_threads(log)
                assert threads == int(wanted)
            finally:
                os.killpg(child.pid, signal.SIGTERM)
                assert await asyncio.wait_for(child.wait(), 10) is not None
    finally:
        await zygote.close()


def _text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


async def until(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def _reported_threads(log: Path) -> int:
    await until(lambda: "torch threads" in _text(log))
    found = re.search(r"torch threads (\d+)", _text(log))
    assert found, _text(log)[-500:]
    return int(found.group(1))


async def test_a_runtime_closed_while_its_zygote_imports_leaves_no_zygote(tmp_path: Path) -> None:
    rt = ProcessRuntime(tmp_path / "logs", cluster="zygote-early-close")
    assert rt.zygote is not None
    rt.warm_up()
    socket_path = str(rt.zygote.socket_path)

    def zygotes() -> list[psutil.Process]:
        return [
            p for p in psutil.process_iter(["cmdline"]) if socket_path in (p.info["cmdline"] or [])
        ]

    deadline = asyncio.get_running_loop().time() + 30
    while not zygotes():  # started, still importing torch
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    await rt.close()
    _, alive = psutil.wait_procs(zygotes(), timeout=10)
    assert alive == []
