"""Reconciliation: make the database and what the runtime really runs agree.

Run at start-up and periodically. Instances that run with a matching row and generation are
adopted (their expiry untouched, so a control-plane restart is not a stop); rows whose instance
is gone become FAILED with the reason; labelled instances without a live row are stopped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from control_plane.lifecycle import State
from control_plane.runtimes.base import Listed
from control_plane.supervisor import STOP_GRACE_S, Supervisor
from db import queries
from db.rows import InstanceRow

logger = logging.getLogger(__name__)

GONE_REASON = "the instance's process or container is gone (found by reconciliation)"
# A STARTING row nobody runs yet is left alone this long after its launcher last renewed it
# (every 2 s: scheduler.LOOPS "launch-heartbeat"), or after it was created: its
# launcher may be preparing the model's files (a GGUF conversion takes minutes) or spawning it.
LAUNCH_GRACE_S = 15.0


@dataclass
class Plan:
    adopt: list[tuple[InstanceRow, Listed]] = field(default_factory=list)
    fail: list[tuple[InstanceRow, str]] = field(default_factory=list)
    finish_stop: list[tuple[InstanceRow, Listed | None]] = field(default_factory=list)
    remove: list[Listed] = field(default_factory=list)


def plan(
    rows: list[InstanceRow],
    listed: list[Listed],
    *,
    starting_here: set[int],
    now: datetime,
    starting_grace_s: float,
) -> Plan:
    """Decide what to do with every live row and every labelled instance (pure)."""
    out = Plan()
    by_id: dict[int, Listed] = {}
    for item in listed:
        if item.instance_id in by_id:
            out.remove.append(item)  # a duplicate can only be a leftover
        else:
            by_id[item.instance_id] = item
    for row in rows:
        found = by_id.pop(row.id, None)
        if found is not None and found.generation != row.generation:
            out.remove.append(found)
            found = None
        if row.state == State.STOPPING:
            out.finish_stop.append((row, found))
        elif found is not None:
            if row.id not in starting_here:
                out.adopt.append((row, found))
        elif row.id in starting_here:
            continue
        elif row.state == State.STARTING and now - (
            row.launch_seen_at or row.created_at
        ) < timedelta(seconds=starting_grace_s):
            continue  # its launcher renewed it lately: another control plane is at work
        else:
            out.fail.append((row, GONE_REASON))
    out.remove.extend(by_id.values())
    return out


async def reconcile(
    supervisor: Supervisor, now: datetime, starting_grace_s: float = LAUNCH_GRACE_S
) -> Plan:
    """One pass. The runtime is listed before the rows, so a launch in between is no orphan."""
    listed = await supervisor.runtime.list()
    rows = await queries.live_instances(supervisor.pool)
    decided = plan(
        rows,
        listed,
        starting_here=supervisor.starting_here(),
        now=now,
        starting_grace_s=starting_grace_s,
    )
    for row, found in decided.adopt:
        await supervisor.adopt(row, found)
    for row, reason in decided.fail:
        await supervisor.fail_and_stop(row, reason)
    for row, gone in decided.finish_stop:
        # Nothing left to stop when the runtime no longer lists it: just record STOPPED.
        await supervisor.finish_stopping(row if gone is not None else replace(row, handle=None))
    if decided.remove:
        logger.warning("stopping %d instance(s) that have no live row", len(decided.remove))
        await asyncio.gather(
            *(supervisor.runtime.stop(item.handle, STOP_GRACE_S) for item in decided.remove)
        )
    await supervisor.refresh_routes()
    return decided


async def reconcile_by_database_clock(supervisor: Supervisor) -> Plan:
    """One pass; a STARTING row's age is measured by the database's clock, as it was written."""
    return await reconcile(supervisor, await queries.database_now(supervisor.pool))
