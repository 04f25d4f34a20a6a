"""The lifecycle event hub: one LISTEN connection per control plane, fanned out to subscribers.

Triggers copy every instance and model job transition into `lifecycle_events` and NOTIFY its id
on `mlcp_events` when the transaction commits, so every control plane sharing the database hears
every transition, whichever of them made it. The hub reads the announced rows (in commit order,
as PostgreSQL delivers notifications) and hands each to the subscribers allowed to see it; a poll
every `poll_s` catches up on anything announced while the listening connection was down.

Accuracy bound of replay (`Last-Event-ID`): ids come from a sequence, so two transitions
committing at nearly the same time can commit in the other order than their ids. A live
subscriber still gets both (delivery follows the notifications, not the ids); a client that
disconnects in the few milliseconds between the two commits and replays from the higher id can
miss the lower one. Transitions are single statements or short admission transactions, so that
window is the length of one such transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from control_plane.auth import Principal
from control_plane.schemas import iso
from db import DatabaseUnavailable, queries
from db.pool import LOST_CONNECTION_ERRORS, Pool, connect
from db.rows import LifecycleEventRow

logger = logging.getLogger(__name__)

CHANNEL = "mlcp_events"
POLL_S = 5.0
RECONNECT_S = 1.0
# A subscriber that falls this far behind re-reads from the database instead of holding more.
QUEUE_MAX = 1000
REPLAY_PAGE = 500
# Ids already handed out, remembered so the poll never delivers an event twice.
_SEEN_MAX = 10_000
_DB_ERRORS = (DatabaseUnavailable, OSError, asyncpg.PostgresError, *LOST_CONNECTION_ERRORS)


def render_lifecycle_event(row: LifecycleEventRow) -> dict[str, Any]:
    """The public shape of one event (the `data` of a `lifecycle` server-sent event)."""
    return {
        "id": row.id,
        "kind": row.kind,
        "model": row.model,
        "instance": row.instance_id,
        "job": row.job_id,
        "from": row.from_state,
        "to": row.to_state,
        "reason": row.reason,
        "at": iso(row.at),
    }


def viewer(principal: Principal) -> int | None:
    """The owner filter of a principal: None (every event) for admins, else its key id."""
    return None if principal.is_admin else principal.key_id


def visible(row: LifecycleEventRow, owner: int | None) -> bool:
    return owner is None or row.owner_key_id is None or row.owner_key_id == owner


@dataclass(eq=False)
class Subscription:
    owner: int | None
    # The newest event the hub had handed out when this subscription began.
    start_id: int = 0
    queue: asyncio.Queue[LifecycleEventRow | None] = field(
        default_factory=lambda: asyncio.Queue(QUEUE_MAX)
    )
    overflowed: bool = False


class EventHub:
    """Listens on `mlcp_events` and fans each event out to the subscribers that may see it."""

    def __init__(self, dsn: str, pool: Pool, *, poll_s: float = POLL_S) -> None:
        self._dsn = dsn
        self._pool = pool
        self._poll_s = poll_s
        self._subs: set[Subscription] = set()
        self._announced: list[int] = []
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._seen: OrderedDict[int, None] = OrderedDict()
        self._max_id = 0
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def start(self) -> None:
        self._max_id = await queries.max_event_id(self._pool)
        self._task = asyncio.create_task(self._run(), name="mlcp-event-hub")

    async def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
        for sub in list(self._subs):
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.overflowed = False
            sub.queue.put_nowait(None)  # ends its stream

    @contextlib.contextmanager
    def subscribe(self, principal: Principal) -> Any:
        sub = Subscription(viewer(principal), self._max_id)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload.isascii() and payload.isdigit():
            self._announced.append(int(payload))
            self._wake.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._dsn)
                await conn.add_listener(CHANNEL, self._on_notify)
                self.listening.set()
                await self._catch_up()
                while not self._stop.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_s)
                    self._wake.clear()
                    if self._announced:
                        ids, self._announced = self._announced, []
                        self._deliver(await queries.events_by_ids(self._pool, ids))
                    else:
                        await self._catch_up()
            except _DB_ERRORS as exc:
                logger.warning(
                    "event listener lost the database (%s); retrying", type(exc).__name__
                )
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(*_DB_ERRORS):
                        await conn.close(timeout=2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RECONNECT_S)

    async def _catch_up(self) -> None:
        """Deliver events committed since the newest one handed out (missed notifications)."""
        while True:
            rows = await queries.events_after(self._pool, self._max_id, None, REPLAY_PAGE)
            self._deliver(rows)
            if len(rows) < REPLAY_PAGE:
                return

    def _deliver(self, rows: list[LifecycleEventRow]) -> None:
        for row in rows:
            if row.id in self._seen:
                continue
            self._seen[row.id] = None
            if len(self._seen) > _SEEN_MAX:
                self._seen.popitem(last=False)
            self._max_id = max(self._max_id, row.id)
            for sub in self._subs:
                if sub.overflowed or not visible(row, sub.owner):
                    continue
                try:
                    sub.queue.put_nowait(row)
                except asyncio.QueueFull:
                    sub.overflowed = True


async def replay(pool: Pool, owner: int | None, after_id: int) -> AsyncIterator[LifecycleEventRow]:
    """Every event after `after_id` the viewer may see, from the database, oldest first."""
    while True:
        rows = await queries.events_after(pool, after_id, owner, REPLAY_PAGE)
        for row in rows:
            yield row
        if len(rows) < REPLAY_PAGE:
            return
        after_id = rows[-1].id


async def follow(
    pool: Pool, sub: Subscription, after_id: int | None, tail: int, *, keep_following: bool
) -> AsyncIterator[LifecycleEventRow]:
    """Replay (after `after_id`, or the newest `tail`), then live events until the hub closes.

    The subscription is registered before the replay is read, so an event committed meanwhile
    arrives through the queue; ids already replayed are skipped there.
    """
    replayed: set[int] = set()
    cursor = sub.start_id
    if after_id is not None:
        async for row in replay(pool, sub.owner, after_id):
            replayed.add(row.id)
            yield row
        cursor = max([after_id, *replayed])
    elif tail > 0:
        for row in await queries.events_tail(pool, sub.owner, tail):
            replayed.add(row.id)
            yield row
    if not keep_following:
        return
    while True:
        if sub.overflowed:
            # Too far behind to hold in memory: read what it missed from the database.
            while not sub.queue.empty():
                sub.queue.get_nowait()
            sub.overflowed = False
            replayed.clear()
            async for row in replay(pool, sub.owner, cursor):
                replayed.add(row.id)
                cursor = max(cursor, row.id)
                yield row
            continue
        item = await sub.queue.get()
        if item is None:
            return
        if item.id in replayed:
            continue
        cursor = max(cursor, item.id)
        yield item
