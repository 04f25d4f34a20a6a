"""Release a stopped GPU instance's reservation only once NVML shows its memory back.

A CUDA process's memory is returned by the driver some time after the process exits (up to
seconds under load); placing the next model on that GPU before then can fail its load with "out
of memory" although admission counted the memory free. Like Ollama's "wait for VRAM recovery",
the stop path reads the GPU's free memory before stopping, and after the process is gone waits
until most of the instance's reservation is free again, within a deadline (then it releases
anyway and logs it, so a wrong reading can never hold memory forever).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# The share of a reservation that must show up as free: the reservation carries a margin, and
# other tenants of the GPU may take a little meanwhile.
RECOVERED_FRACTION = 0.75
DEADLINE_S = 10.0
POLL_S = 0.1

FreeReader = Callable[[str], int | None]  # a GPU's free bytes now ("cuda:0"), None: unreadable


def recovered(free_before: int, free_now: int, reserved_bytes: int) -> bool:
    """Whether the memory freed since `free_before` covers most of `reserved_bytes`."""
    return free_now - free_before >= RECOVERED_FRACTION * reserved_bytes


async def wait_for_recovery(
    device: str,
    reserved_bytes: int,
    free_before: int | None,
    read_free: FreeReader,
    *,
    deadline_s: float = DEADLINE_S,
    poll_s: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
) -> float | None:
    """Wait until `device` shows `reserved_bytes` back; seconds waited, None at the deadline.

    Nothing to wait for (0.0) when the instance held nothing there or NVML cannot be read.
    """
    if reserved_bytes <= 0 or free_before is None:
        return 0.0
    started = clock()
    while True:
        now_free = await asyncio.to_thread(read_free, device)
        if now_free is None:
            return 0.0
        if recovered(free_before, now_free, reserved_bytes):
            return clock() - started
        if clock() - started >= deadline_s:
            logger.warning(
                "%s: %.2f GB of %.2f GB came back within %.0f s of the instance stopping; "
                "releasing its reservation anyway",
                device,
                max(0, now_free - free_before) / 1e9,
                reserved_bytes / 1e9,
                deadline_s,
            )
            return None
        await asyncio.sleep(poll_s)
