"""The benchmarker's measurement, forked from a real zygote as the process runtime's instances are:
one agent measures every concurrency, and a measuring agent never outlives its zygote."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from benchmarker.measure import MAX_NEW_TOKENS, Child, Target, _wait_ready, agent_env, measure
from instance_agent.zygote_client import Zygote, ZygoteChild
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("measure-models") / "tiny")


@pytest.fixture
async def zygote(tmp_path: Path) -> AsyncIterator[Zygote]:
    z = Zygote(tmp_path / "z", agent_env(), tmp_path / "zygote.log")
    await z.ensure_started()
    try:
        yield z
    finally:
        await z.close()


async def test_one_forked_agent_measures_every_concurrency(tiny: Path, zygote: Zygote) -> None:
    started: list[int] = []
    real_spawn = zygote.spawn

    async def spawn(*args: object, **kwargs: object) -> ZygoteChild:
        child = await real_spawn(*args, **kwargs)  # type: ignore[arg-type]
        started.append(child.pid)
        return child

    zygote.spawn = spawn  # type: ignore[method-assign]
    profile = await measure(Target("t/tiny", tiny), zygote=zygote)
    assert len(started) == 1  # forked once, for all three concurrencies
    assert [p.concurrency for p in profile.phases] == [1, 2, 4]
    assert [p.tokens for p in profile.phases] == [MAX_NEW_TOKENS * c for c in (1, 2, 4)]
    peaks = [p.peak_rss_bytes for p in profile.phases]
    assert peaks == sorted(peaks) and peaks[0] >= profile.loaded_rss_bytes > 0
    assert not psutil.pid_exists(started[0]) or (
        psutil.Process(started[0]).status() == psutil.STATUS_ZOMBIE
    )


async def test_a_measuring_agent_dies_with_its_zygote(tiny: Path, zygote: Zygote) -> None:
    child = await Child.start(Target("t/tiny", tiny), 1, None, zygote)
    try:
        assert isinstance(child.proc, ZygoteChild)
        agent = psutil.Process(child.proc.pid)
        assert agent.ppid() == zygote.pid
        async with aiohttp.ClientSession() as http:
            await _wait_ready(http, child, "t/tiny")
        await zygote.close()  # as when its control plane dies: the zygote's stdin closes
        gone, _ = await asyncio.to_thread(psutil.wait_procs, [agent], 10)
        assert gone, "the measuring agent outlived its zygote"
        assert child.gone
    finally:
        await child.stop()
