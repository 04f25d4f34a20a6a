"""Per-key limits on the request path, with the counters kept off it (control_plane/limits.py
holds the decisions).

Monthly calls hold across control planes on one database: each control plane reserves a block
of a key's calls with one conditional statement (`reserve_calls`: calls + held never exceed the
limit), spends it in memory, and writes what it served and gives back what it did not use in
`flush` (every second; unused calls after 10 s idle, at a new month and at shutdown). So no more
than the limit is ever served, and a control plane holds at most `quota_block_calls` of a key's
calls unserved (at most a quarter of what is left, so the last calls go one at a time); one
killed with calls held leaves those unserved for the month. A reservation is a database round
trip on the request path once per block; a key found spent is asked about again after 1 s.

Requests per minute and concurrent streams are counted per control plane (in memory, exact
there): behind a balancer over N control planes a key gets at most N times either.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from types import TracebackType

from control_plane.auth import Principal
from control_plane.errors import QuotaExceeded, RateLimited, TooManyRequests, TooManyStreams
from control_plane.limits import (
    Limits,
    effective,
    month_of,
    prune,
    rate_headers,
    render_month,
    seconds_to_next_month,
    window_reset_s,
)
from control_plane.settings import Settings
from db import queries
from db.queries import Executor
from db.rows import KeyLimits

# A key found without calls left is asked about again after this long (calls another control
# plane gives back become usable here within it).
EXHAUSTED_RECHECK_S = 1.0
# Reserved calls not used for this long are given back, for other control planes to serve.
IDLE_RETURN_S = 10.0


@dataclass
class Share:
    """This control plane's part of one key's month."""

    allowance: int = 0  # reserved at the database, not served yet
    spent: int = 0  # served from the allowance since the last flush
    calls: int = 0  # served since the last flush (limited or not)
    used_seen: int = 0  # calls + held at the database after this node's last reservation
    exhausted_until: float = 0.0
    last_use: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class CallBook:
    """Every key's calls this month as this control plane sees them; see the module docstring."""

    def __init__(
        self,
        db: Executor,
        block: int,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._block = block
        self._clock = clock
        self._wall = wall
        self._shares: dict[tuple[int, date], Share] = {}
        self._flush_lock = asyncio.Lock()

    def _share(self, key_id: int, month: date) -> Share:
        share = self._shares.get((key_id, month))
        if share is None:
            share = self._shares[(key_id, month)] = Share()
        return share

    async def take(self, key_id: int, month: date, limit: int) -> int | None:
        """Count one call; the calls left after it (an estimate), or None when none are left.

        With `limit` 0 (unlimited) the call is only counted, and 0 is answered.
        """
        share = self._share(key_id, month)
        share.last_use = now = self._clock()
        if limit > 0 and share.allowance <= 0:
            if now < share.exhausted_until:
                return None
            await self._reserve(share, key_id, month, limit)
            if share.allowance <= 0:
                share.exhausted_until = self._clock() + EXHAUSTED_RECHECK_S
                return None
        share.calls += 1
        if limit == 0:
            return 0
        share.allowance -= 1
        share.spent += 1
        return max(0, limit - share.used_seen + share.allowance)

    async def _reserve(self, share: Share, key_id: int, month: date, limit: int) -> None:
        # One reservation at a time per key: the requests that arrive meanwhile share it.
        async with share.lock:
            if share.allowance > 0:
                return
            wanted = min(self._block, max(1, (limit - share.used_seen) // 4))
            granted, used = await queries.reserve_calls(self._db, key_id, month, wanted, limit)
            share.allowance += granted
            share.used_seen = used

    def give_back(self, key_id: int, month: date, *, limited: bool) -> None:
        """Uncount a call that never reached an instance (its allowance is kept for the next)."""
        share = self._share(key_id, month)
        share.calls -= 1
        if limited:
            share.allowance += 1
            share.spent -= 1

    def unflushed(self, key_id: int, month: date) -> int:
        share = self._shares.get((key_id, month))
        return share.calls if share else 0

    async def flush(self, *, release_all: bool = False) -> None:
        """Write served calls; give back calls held idle, of a past month, or all (shutdown)."""
        async with self._flush_lock:
            now, current = self._clock(), month_of(self._wall())
            for (key_id, month), share in list(self._shares.items()):
                idle = now - share.last_use > IDLE_RETURN_S
                give = 0
                if (release_all or idle or month != current) and not share.lock.locked():
                    give = share.allowance
                calls, spent = share.calls, share.spent
                if not (calls or spent or give):
                    if idle and share.allowance == 0 and not share.lock.locked():
                        del self._shares[(key_id, month)]
                    continue
                share.calls, share.spent = 0, 0
                share.allowance -= give
                try:
                    await queries.record_calls(self._db, key_id, month, calls, spent + give)
                except Exception:
                    share.calls += calls
                    share.spent += spent
                    share.allowance += give
                    raise


class Ticket:
    """One admitted request: its RateLimit-* headers; `refund` if it never reached an instance.

    As a context manager it refunds when the block raises (the request failed before an
    instance answered: a load error, a full queue), so a client retrying a 503 is not charged.
    """

    __slots__ = ("_key_id", "_limited", "_limiter", "_month", "_stream", "headers")

    def __init__(
        self,
        limiter: Limiter,
        key_id: int,
        month: date,
        limited: bool,
        stream: bool,
        headers: dict[str, str],
    ) -> None:
        self._limiter = limiter
        self._key_id = key_id
        self._month = month
        self._limited = limited
        self._stream = stream
        self.headers = headers

    def refund(self) -> None:
        self._limiter.book.give_back(self._key_id, self._month, limited=self._limited)
        self.end_stream()

    def end_stream(self) -> None:
        """The stream this request opened has ended (called exactly once by the relay)."""
        if self._stream:
            self._stream = False
            self._limiter.stream_ended(self._key_id)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.refund()


class Limiter:
    """Admits a key's requests under its limits; one per control plane (AppState.limiter)."""

    def __init__(
        self,
        db: Executor,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.defaults = Limits(
            settings.default_monthly_calls,
            settings.default_rpm,
            settings.default_concurrent_streams,
            settings.default_max_apis,
            settings.default_max_instances,
        )
        self.book = CallBook(db, settings.quota_block_calls, clock, wall)
        self._clock = clock
        self._wall = wall
        self._windows: dict[int, deque[float]] = {}
        self._streams: dict[int, int] = {}
        # Resolved limits by (own limits, scope): resolving is a dozen attribute reads per request.
        self._resolved: dict[tuple[KeyLimits, str], Limits] = {}
        # The current UTC month and the Unix times it starts and ends, recomputed outside them.
        self._month = month_of(0.0)
        self._month_start = self._month_end = 0.0

    def limits_of(self, principal: Principal) -> Limits:
        known = self._resolved.get((principal.limits, principal.scope))
        if known is None:
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            known = effective(principal.limits, principal.scope, self.defaults)
            self._resolved[(principal.limits, principal.scope)] = known
        return known

    def _month_at(self, wall: float) -> tuple[date, float]:
        """The UTC month of `wall`, and the seconds left in it."""
        if not self._month_start <= wall < self._month_end:
            self._month = month_of(wall)
            self._month_start = datetime(*self._month.timetuple()[:3], tzinfo=UTC).timestamp()
            self._month_end = wall + seconds_to_next_month(wall)
        return self._month, self._month_end - wall

    def stream_ended(self, key_id: int) -> None:
        left = self._streams.get(key_id, 0) - 1
        if left > 0:
            self._streams[key_id] = left
        else:
            self._streams.pop(key_id, None)

    async def admit(self, principal: Principal, *, stream: bool = False) -> Ticket:
        """Count one inference request of `principal`, or raise the 429 of the limit it is over."""
        limits = self.limits_of(principal)
        key_id = principal.key_id
        self._check(key_id, limits, stream, self._clock())
        month, reset_s = self._month_at(self._wall())
        left = await self.book.take(key_id, month, limits.monthly_calls)
        if left is None:
            raise QuotaExceeded(
                f"this key has used its {limits.monthly_calls:,} calls for "
                f"{render_month(month)}; they renew at the start of next month (UTC)",
                retry_after_s=math.ceil(reset_s),
                rate_limit=rate_headers(limits.monthly_calls, 0, reset_s),
            )
        now = self._clock()
        try:
            # Again: other requests of the key may have been admitted while the block was
            # reserved.
            self._check(key_id, limits, stream, now)
        except TooManyRequests:
            self.book.give_back(key_id, month, limited=limits.monthly_calls > 0)
            raise
        tightest: tuple[int, int, float] | None = None
        if limits.requests_per_minute:
            window = self._windows.get(key_id)
            if window is None:
                window = self._windows[key_id] = deque()
            window.append(now)
            rpm = limits.requests_per_minute
            tightest = (rpm, rpm - len(window), window_reset_s(window, now))
        if limits.monthly_calls and (tightest is None or left < tightest[1]):
            tightest = (limits.monthly_calls, left, reset_s)
        if stream:
            self._streams[key_id] = self._streams.get(key_id, 0) + 1
        headers = rate_headers(*tightest) if tightest else {}
        return Ticket(self, key_id, month, limits.monthly_calls > 0, stream, headers)

    def _check(self, key_id: int, limits: Limits, stream: bool, now: float) -> None:
        rpm = limits.requests_per_minute
        window = self._windows.get(key_id) if rpm else None
        if window:
            prune(window, now)
            if len(window) >= rpm:
                reset_s = window_reset_s(window, now)
                raise RateLimited(
                    f"this key may send {rpm:,} requests a minute; retry in {math.ceil(reset_s)} s",
                    retry_after_s=math.ceil(reset_s),
                    rate_limit=rate_headers(rpm, 0, reset_s),
                )
        cap = limits.concurrent_streams
        if stream and cap and self._streams.get(key_id, 0) >= cap:
            raise TooManyStreams(
                f"this key may have {cap:,} streams open at once; finish one first",
                rate_limit=rate_headers(cap, 0, 1),
            )

    async def flush(self, *, release_all: bool = False) -> None:
        """Write the calls served (the book) and drop idle per-minute windows."""
        now = self._clock()
        for key_id, window in list(self._windows.items()):
            prune(window, now)
            if not window:
                del self._windows[key_id]
        await self.book.flush(release_all=release_all)
