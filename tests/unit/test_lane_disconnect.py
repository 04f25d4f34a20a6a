"""relay.CancelOnDisconnect on the fast lane: told by the protocol, no watcher task."""

from __future__ import annotations

import asyncio
from typing import Any

from control_plane.fast_lane import LaneReceive, client_left
from control_plane.relay import CancelOnDisconnect


class Cycle:
    """What LaneReceive reads of uvicorn's RequestResponseCycle."""

    def __init__(self, disconnected: bool = False) -> None:
        self.disconnected = disconnected

    async def receive(self) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}


async def _guarded(receive: LaneReceive, work_s: float) -> tuple[bool, int]:
    tasks_before = len(asyncio.all_tasks())
    with CancelOnDisconnect(receive) as guard:  # type: ignore[arg-type]
        during = len(asyncio.all_tasks()) - tasks_before
        await asyncio.sleep(work_s)
    return guard.disconnected, during


async def test_a_client_leaving_cancels_the_block_and_is_said() -> None:
    cycle = Cycle()
    task = asyncio.ensure_future(_guarded(LaneReceive(cycle), 10))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    cycle.disconnected = True
    client_left(cycle)  # type: ignore[arg-type]
    disconnected, watchers = await asyncio.wait_for(task, 1)
    assert disconnected and watchers == 0
    assert not task.cancelled()


async def test_a_client_that_already_left_cancels_at_once() -> None:
    cycle = Cycle(disconnected=True)
    disconnected, _ = await asyncio.wait_for(_guarded(LaneReceive(cycle), 10), 1)  # type: ignore[arg-type]
    assert disconnected


async def test_a_block_that_ends_first_is_not_cancelled_later() -> None:
    cycle = Cycle()
    disconnected, _ = await _guarded(LaneReceive(cycle), 0)  # type: ignore[arg-type]
    assert not disconnected
    assert not cycle.mlcp_on_lost  # type: ignore[attr-defined]
    client_left(cycle)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)  # nothing left to call, and no task to cancel


async def test_someone_elses_cancel_is_not_swallowed() -> None:
    cycle = Cycle()
    task = asyncio.ensure_future(_guarded(LaneReceive(cycle), 10))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert task.cancelled()
