"""Per-key limits: which apply to a key, their fields in the API, and the pure decisions.

A key's own value of a limit is None (take the MLCP_DEFAULT_* setting), 0 (unlimited) or a
positive bound. The defaults apply to user keys only: an admin or metrics key is limited only by
the values set on it, so an operator is never locked out by a default meant for users.

The decisions take `now` as a parameter: the requests-per-minute window is a sliding log of the
key's admitted requests in the last 60 s (exact per control plane), and the RateLimit-* headers
follow draft-ietf-httpapi-ratelimit-headers (limit, remaining, seconds until reset).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from typing import Any

from control_plane.errors import InvalidField, InvalidQuery
from db.rows import KeyLimits

WINDOW_S = 60.0

# Public field name → (column of api_keys, largest value accepted). Above these a value is a typo
# or an attack on memory (the per-minute window keeps one timestamp per admitted request).
LIMIT_FIELDS: dict[str, tuple[str, int]] = {
    "monthlyCalls": ("monthly_calls", 1_000_000_000),
    "requestsPerMinute": ("requests_per_minute", 100_000),
    "concurrentStreams": ("concurrent_streams", 10_000),
    "maxApis": ("max_apis", 10_000),
    "maxInstances": ("max_instances", 10_000),
}


@dataclass(frozen=True)
class Limits:
    """The limits that apply to one key now; 0 means unlimited."""

    monthly_calls: int = 0
    requests_per_minute: int = 0
    concurrent_streams: int = 0
    max_apis: int = 0
    max_instances: int = 0


UNLIMITED = Limits()


def effective(own: KeyLimits, scope: str, defaults: Limits) -> Limits:
    """What applies to a key: its own values, the defaults where it has none (user keys)."""
    base = defaults if scope == "user" else UNLIMITED
    values = {
        f.name: getattr(own, f.name) if getattr(own, f.name) is not None else getattr(base, f.name)
        for f in fields(Limits)
    }
    return Limits(**values)


def parse_limit_fields(obj: dict[str, Any]) -> dict[str, int | None]:
    """The limit fields present in a body, as {column: value}; null asks for the default.

    Each must be null or a whole number from 0 (unlimited) to its maximum; booleans, fractions,
    strings and numbers beyond the maximum are refused (422).
    """
    changes: dict[str, int | None] = {}
    for name, (column, most) in LIMIT_FIELDS.items():
        if name not in obj:
            continue
        value = obj[name]
        if value is None:
            changes[column] = None
            continue
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidField(f"'{name}' must be a whole number (0: unlimited) or null")
        if not 0 <= value <= most:
            raise InvalidField(
                f"'{name}' must be from 0 (unlimited) to {most:,}, or null for the default"
            )
        changes[column] = value
    return changes


def render_limits(limits: KeyLimits | Limits) -> dict[str, int | None]:
    """Limits under their public names."""
    return {name: getattr(limits, column) for name, (column, _) in LIMIT_FIELDS.items()}


# -- months (UTC) ---------------------------------------------------------------------------------


def month_of(ts: float) -> date:
    """The first day of the UTC month holding Unix time `ts`."""
    day = datetime.fromtimestamp(ts, UTC)
    return date(day.year, day.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def seconds_to_next_month(ts: float) -> float:
    start = next_month(month_of(ts))
    return datetime(start.year, start.month, 1, tzinfo=UTC).timestamp() - ts


def parse_month(text: str | None, ts: float) -> date:
    """`YYYY-MM` from a query string (None: the month of `ts`); anything else is 400."""
    if text is None:
        return month_of(ts)
    year, dash, mon = text.partition("-")
    if not (
        dash
        and len(year) == 4
        and len(mon) == 2
        and (year + mon).isascii()
        and (year + mon).isdigit()
        and 2000 <= int(year) <= 9999
        and 1 <= int(mon) <= 12
    ):
        raise InvalidQuery("'month' must be a month like 2026-01 (YYYY-MM, from year 2000)")
    return date(int(year), int(mon), 1)


def render_month(month: date) -> str:
    return f"{month.year:04d}-{month.month:02d}"


# -- requests per minute ----------------------------------------------------------------------


def prune(window: deque[float], now: float) -> None:
    """Drop admissions older than the window."""
    while window and window[0] <= now - WINDOW_S:
        window.popleft()


def window_full(window: deque[float], limit: int) -> bool:
    return len(window) >= limit


def window_reset_s(window: deque[float], now: float) -> float:
    """Seconds until the oldest admission in the window leaves it (0 when it is empty)."""
    return max(0.0, window[0] + WINDOW_S - now) if window else 0.0


# -- headers ------------------------------------------------------------------------------------


def rate_headers(limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    """The RateLimit-* headers of one limit (seconds rounded up, at least 1 when not reset)."""
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(max(0, remaining)),
        "RateLimit-Reset": str(max(0, math.ceil(reset_s))),
    }
