"""A typed client for an instance agent's control endpoints: `GET /health`, `PUT /config`.

Everything that watches an agent — the supervisor (start, drain, health checks), the gRPC front
(the instance's gRPC port), the benchmarker's measuring child, benchmarks — asks through here,
so "is it up, how busy is it, what did it measure" has one reading of the wire format
(`instance_agent.protocol.HealthReady`). Imported by the layers above; the agent never imports
it (aiohttp is the callers' dependency, not the agent's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp

from instance_agent.lease import LEASE_HEADER
from instance_agent.protocol import HealthReady

HEALTH_TIMEOUT_S = 3.0
HEALTH_POLL_S = 0.1

# Fields a ready agent always reports, with their types (protocol.HealthReady).
_READY_INTS = ("concurrency", "maxQueue", "inFlight", "queued")


class AgentUnreachable(Exception):
    """The agent did not answer (connection refused or reset, timeout, not JSON)."""


class AgentNotReady(Exception):
    """The agent answered, but is not serving: loading, failed, or a malformed health body."""


def parse_ready(body: object) -> HealthReady | None:
    """A ready agent's health body, checked, or None for any other body."""
    if not isinstance(body, dict) or body.get("status") != "healthy":
        return None
    if not all(isinstance(body.get(name), int) for name in _READY_INTS):
        return None
    if not isinstance(body.get("memory"), dict):
        return None
    return cast(HealthReady, body)


class AgentClient:
    """Calls one agent or another through a shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, timeout_s: float = HEALTH_TIMEOUT_S):
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def health(self, endpoint: str, *, lease_s: float | None = None) -> HealthReady:
        """The agent's health when it is ready; `lease_s` renews its lease (`lease.py`).

        Raises AgentUnreachable when nothing answers and AgentNotReady otherwise.
        """
        headers = {LEASE_HEADER: f"{lease_s:.0f}"} if lease_s is not None else None
        try:
            async with self._session.get(
                endpoint + "/health", headers=headers, timeout=self._timeout
            ) as resp:
                body: Any = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AgentUnreachable(f"{type(exc).__name__}: {exc}") from exc
        ready = parse_ready(body) if resp.status == 200 else None
        if ready is None:
            status = body.get("status") if isinstance(body, dict) else None
            raise AgentNotReady(f"the agent answered {resp.status} ({status or 'no status'})")
        return ready

    async def wait_ready(
        self,
        endpoint: str,
        timeout_s: float,
        exited: Callable[[], Awaitable[str | None]],
        *,
        poll_s: float = HEALTH_POLL_S,
    ) -> HealthReady:
        """Poll until the agent is ready. `exited` says why the agent's process ended (or None
        while it runs); that reason, or a timeout, is raised as AgentNotReady."""
        deadline = time.monotonic() + timeout_s
        while True:
            reason = await exited()
            if reason is not None:
                raise AgentNotReady(reason)
            try:
                return await self.health(endpoint)
            except (AgentUnreachable, AgentNotReady):
                pass
            if time.monotonic() > deadline:
                raise AgentNotReady(f"the instance did not become healthy within {timeout_s:.0f} s")
            await asyncio.sleep(poll_s)

    async def set_concurrency(self, endpoint: str, concurrency: int) -> bool:
        """Change a running agent's concurrency; False when it refused or did not answer."""
        try:
            async with self._session.put(
                endpoint + "/config", json={"concurrency": concurrency}, timeout=self._timeout
            ) as resp:
                return resp.status < 400
        except (aiohttp.ClientError, TimeoutError):
            return False
