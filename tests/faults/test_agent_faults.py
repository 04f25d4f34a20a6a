"""An instance agent SIGKILLed or SIGSTOPped in the middle of a request or a stream (issue 17,
defect 7)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.faults.scenario import control_plane
from tests.harness import Api, instance_pid, load, wait_gone, wait_status

pytestmark = pytest.mark.faults

SLOW = "fake/slow"


@pytest.fixture
async def api(db_dsn: str, tmp_path: Path) -> AsyncIterator[Api]:
    # A 4 s answer, so the fault lands mid-request.
    models = {SLOW: {"mode": "slow", "delay_s": 0.4, "tokens": 10}}
    async with control_plane(db_dsn, tmp_path, models) as served:
        yield served


async def run_once(api: Api) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    async with api.session.post(
        api.base + "/model/run",
        json={"model": SLOW, "prompt": "hi"},
        headers=api.headers(),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as resp:
        return resp.status, await resp.json(content_type=None), time.monotonic() - started


async def test_agent_sigkilled_mid_request(api: Api) -> None:
    await load(api, SLOW)
    await wait_status(api, SLOW, "RUNNING")
    pid = await instance_pid(api, SLOW)
    request = asyncio.create_task(run_once(api))
    await asyncio.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    status, body, took = await request
    assert (status, body["code"]) == (502, "instance_failed"), body
    assert took < 3, took
    failed = await wait_status(api, SLOW, "FAILED", timeout_s=10)
    assert "SIGKILL" in failed["reason"], failed


async def test_agent_sigstopped_mid_request(api: Api) -> None:
    await load(api, SLOW)
    await wait_status(api, SLOW, "RUNNING")
    pid = await instance_pid(api, SLOW)
    request = asyncio.create_task(run_once(api))
    await asyncio.sleep(0.5)
    os.kill(pid, signal.SIGSTOP)
    try:
        status, body, took = await asyncio.wait_for(request, 40)
        # No progress: 504 once it has not answered health checks for MLCP_PROGRESS_TIMEOUT_S
        # (5 s), before the kill (3 missed checks) and not ~17 s later as before.
        assert (status, body["code"]) == (504, "instance_timeout"), body
        assert took < 12, took
        failed = await wait_status(api, SLOW, "FAILED", timeout_s=30)
        # It was killed because it hung: the reason says so, not "killed by SIGKILL".
        assert "stopped answering health checks" in failed["reason"], failed
        await wait_gone(pid)
    finally:
        # Never leave a stopped process behind, whatever failed above.
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def stream_once(
    api: Api, chunks: list[str], started_streaming: asyncio.Event
) -> tuple[int, float]:
    """Stream SLOW's answer into `chunks` as it comes; (status, seconds from start to end)."""
    started = time.monotonic()
    async with api.session.post(
        api.base + "/model/run",
        json={"model": SLOW, "prompt": "hi", "stream": True},
        headers=api.headers(),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as resp:
        async for chunk in resp.content.iter_any():
            chunks.append(chunk.decode())
            started_streaming.set()
        return resp.status, time.monotonic() - started


async def test_agent_sigstopped_mid_stream(api: Api) -> None:
    await load(api, SLOW)
    await wait_status(api, SLOW, "RUNNING")
    pid = await instance_pid(api, SLOW)
    chunks: list[str] = []
    started_streaming = asyncio.Event()
    request = asyncio.create_task(stream_once(api, chunks, started_streaming))
    try:
        await asyncio.wait_for(started_streaming.wait(), 10)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        status, _ = await asyncio.wait_for(request, 40)
        # The status went out with the first chunk; the stream ends with the timeout's line
        # after MLCP_PROGRESS_TIMEOUT_S (5 s) without progress, before the kill.
        ended_after = time.monotonic() - stopped_at
        text = "".join(chunks)
        assert status == 200
        assert "[error: instance_timeout] the model instance made no progress" in text, text
        assert text.startswith("tok0 ") and "tok9" not in text, text
        assert ended_after < 12, ended_after
        failed = await wait_status(api, SLOW, "FAILED", timeout_s=30)
        assert "stopped answering health checks" in failed["reason"], failed
        await wait_gone(pid)
    finally:
        request.cancel()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def test_stream_from_a_stopped_agent_is_504(api: Api) -> None:
    await load(api, SLOW)
    await wait_status(api, SLOW, "RUNNING")
    pid = await instance_pid(api, SLOW)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        async with api.session.post(
            api.base + "/model/run",
            json={"model": SLOW, "prompt": "hi", "stream": True},
            headers=api.headers(),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            body = await resp.json(content_type=None)
        took = time.monotonic() - started
        # Nothing was sent yet, so the status can still say it: 504, as for a unary request.
        assert (resp.status, body["code"]) == (504, "instance_timeout"), body
        assert took < 12, took
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
