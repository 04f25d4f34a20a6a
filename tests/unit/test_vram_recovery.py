"""Waiting for a stopped GPU instance's memory to come back before releasing its reservation."""

from __future__ import annotations

import itertools
import logging

import pytest

from control_plane.vram_recovery import recovered, wait_for_recovery

GB = 1_000_000_000


class DelayedGpu:
    """Free memory of one GPU as a fake NVML reports it: back `after` readings late."""

    def __init__(self, before: int, after: int, freed: int) -> None:
        self.before, self.after, self.freed = before, after, freed
        self.readings = 0

    def __call__(self, device: str) -> int | None:
        assert device == "cuda:1"
        self.readings += 1
        return self.before + (self.freed if self.readings > self.after else 0)


def test_recovered_needs_most_of_the_reservation_back() -> None:
    assert recovered(10 * GB, 13 * GB, 4 * GB)
    assert not recovered(10 * GB, 12 * GB, 4 * GB)


async def test_waits_while_the_driver_still_holds_the_memory() -> None:
    gpu = DelayedGpu(10 * GB, after=5, freed=4 * GB)
    ticks = itertools.count(0.0, 0.1)
    waited = await wait_for_recovery(
        "cuda:1", 4 * GB, 10 * GB, gpu, poll_s=0, clock=lambda: next(ticks)
    )
    assert gpu.readings == 6  # five readings without it, the sixth shows it back
    assert waited is not None and waited == pytest.approx(0.6)


async def test_releases_at_the_deadline_when_it_never_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gpu = DelayedGpu(10 * GB, after=10**9, freed=4 * GB)
    ticks = itertools.count(0.0, 1.0)
    with caplog.at_level(logging.WARNING):
        waited = await wait_for_recovery(
            "cuda:1", 4 * GB, 10 * GB, gpu, deadline_s=5, poll_s=0, clock=lambda: next(ticks)
        )
    assert waited is None and 3 <= gpu.readings <= 6
    assert "releasing its reservation anyway" in caplog.text


async def test_nothing_to_wait_for_without_a_reading_or_a_reservation() -> None:
    gpu = DelayedGpu(10 * GB, after=10**9, freed=0)
    assert await wait_for_recovery("cuda:1", 4 * GB, None, gpu) == 0.0
    assert await wait_for_recovery("cuda:1", 0, 10 * GB, gpu) == 0.0
    assert gpu.readings == 0
    assert await wait_for_recovery("cuda:1", 4 * GB, 10 * GB, lambda _d: None) == 0.0
