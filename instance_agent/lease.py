"""An instance's lease: the agent exits by itself once no control plane has renewed it in time.

Instances outlive a stopped control plane on purpose (a restart adopts them), but with no
control plane coming back they ran forever (issue 17: four 370 MB orphans). A control plane
launching an agent sets MLCP_INSTANCE_LEASE_S (the grace period); every health check from any
control plane of the deployment renews the lease with a header giving how long to live: until
the instance's expiry, or the grace period if that is later. Monotonic time only, so a jump of
the wall clock neither kills an agent nor keeps one alive.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

logger = logging.getLogger(__name__)

LEASE_ENV = "MLCP_INSTANCE_LEASE_S"
LEASE_HEADER = "x-mlcp-lease-s"
# How long an agent outlives the last renewal at least (MLCP_INSTANCE_LEASE_GRACE_S).
DEFAULT_LEASE_GRACE_S = 300.0
MAX_LEASE_S = 30 * 86_400.0
CHECK_INTERVAL_S = 1.0


def parse_lease_s(value: str | None) -> float | None:
    """Seconds from a lease header or variable; None when absent or not a sane number."""
    if value is None or len(value) > 32:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or not 1.0 <= seconds <= MAX_LEASE_S:
        return None
    return seconds


class Lease:
    """The time by which a control plane must have renewed this agent's lease."""

    def __init__(self, initial_s: float, now: float) -> None:
        self.deadline = now + initial_s

    def renew(self, seconds: float, now: float) -> None:
        self.deadline = now + seconds

    def expired(self, now: float) -> bool:
        return now >= self.deadline


async def watch(lease: Lease, clock: Callable[[], float], on_expiry: Callable[[], None]) -> None:
    """Call `on_expiry` once the lease has lapsed (checked every CHECK_INTERVAL_S)."""
    while not lease.expired(clock()):  # noqa: ASYNC110  (a deadline that moves, not an event)
        await asyncio.sleep(min(CHECK_INTERVAL_S, max(0.05, lease.deadline - clock())))
    logger.warning("no control plane renewed this instance's lease in time; exiting")
    on_expiry()
