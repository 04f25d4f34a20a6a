"""The pure side of per-key limits: what applies, parsing, months, the per-minute window."""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from control_plane.auth import Principal
from control_plane.errors import InvalidField, InvalidQuery, RateLimited, TooManyStreams
from control_plane.limits import (
    UNLIMITED,
    Limits,
    effective,
    month_of,
    next_month,
    parse_limit_fields,
    parse_month,
    prune,
    rate_headers,
    seconds_to_next_month,
    window_reset_s,
)
from control_plane.quotas import Limiter
from db.rows import KeyLimits
from tests.harness import make_settings


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_own_limits_win_defaults_fill_in_for_user_keys_only() -> None:
    defaults = Limits(monthly_calls=1000, requests_per_minute=60, max_instances=2)
    own = KeyLimits(monthly_calls=0, concurrent_streams=3)
    assert effective(own, "user", defaults) == Limits(0, 60, 3, 0, 2)
    assert effective(own, "admin", defaults) == Limits(0, 0, 3, 0, 0)
    assert effective(KeyLimits(), "metrics", defaults) == UNLIMITED


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ({"monthlyCalls": 5}, {"monthly_calls": 5}),
        ({"monthlyCalls": 0}, {"monthly_calls": 0}),
        ({"monthlyCalls": None}, {"monthly_calls": None}),
        ({"requestsPerMinute": 100_000}, {"requests_per_minute": 100_000}),
        ({"maxApis": 3.0}, {"max_apis": 3}),
        ({"name": "x"}, {}),
    ],
)
def test_limit_fields_parse(body: dict[str, Any], want: dict[str, int | None]) -> None:
    assert parse_limit_fields(body) == want


@pytest.mark.parametrize(
    "body",
    [
        {"monthlyCalls": 1_000_000_001},
        {"requestsPerMinute": 100_001},
        {"concurrentStreams": -1},
        {"maxInstances": 0.5},
        {"maxInstances": float("nan")},
        {"maxApis": False},
        {"maxApis": "3"},
    ],
)
def test_bad_limit_fields(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidField):
        parse_limit_fields(body)


def test_months_are_utc() -> None:
    assert month_of(ts(2026, 12, 31, 23, 59, 59)) == date(2026, 12, 1)
    assert month_of(ts(2027, 1, 1)) == date(2027, 1, 1)
    assert next_month(date(2026, 12, 1)) == date(2027, 1, 1)
    assert next_month(date(2027, 1, 1)) == date(2027, 2, 1)
    assert seconds_to_next_month(ts(2026, 12, 31, 23, 59, 30)) == 30
    assert parse_month(None, ts(2026, 2, 10)) == date(2026, 2, 1)
    assert parse_month("2030-07", 0) == date(2030, 7, 1)
    for bad in ("2030-7", "2030-13", "1999-01", "+203-01", "٢٠٣٠-01", "2030-01x"):
        with pytest.raises(InvalidQuery):
            parse_month(bad, 0)


def test_the_window_slides() -> None:
    window = deque([0.0, 10.0, 59.0])
    prune(window, 60.0)
    assert list(window) == [10.0, 59.0]
    assert window_reset_s(window, 60.0) == 10.0
    assert window_reset_s(deque(), 60.0) == 0.0
    assert rate_headers(60, -1, 0.2) == {
        "RateLimit-Limit": "60",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "1",
    }


class NoDatabase:
    """Limits that never reach the database (no monthly quota) must not ask it anything."""

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        raise AssertionError("no query expected")

    async def fetchrow(self, query: str, *args: Any) -> Any:
        raise AssertionError("no query expected")

    async def fetchval(self, query: str, *args: Any) -> Any:
        raise AssertionError("no query expected")

    async def execute(self, query: str, *args: Any) -> str:
        raise AssertionError("no query expected")


def test_per_minute_and_stream_limits_on_a_clock(tmp_path: Path) -> None:
    now = [1000.0]
    limiter = Limiter(
        NoDatabase(),
        make_settings("postgresql://127.0.0.1:1/none", tmp_path),
        clock=lambda: now[0],
        wall=lambda: ts(2026, 12, 31, 23, 59, 0),
    )
    alice = Principal(1, "alice", "user", KeyLimits(requests_per_minute=2, concurrent_streams=1))

    async def scenario() -> None:
        first = await limiter.admit(alice, stream=True)
        assert first.headers["RateLimit-Remaining"] == "1"
        now[0] += 30
        with pytest.raises(TooManyStreams):
            await limiter.admit(alice, stream=True)
        first.end_stream()
        first.end_stream()  # once only
        second = await limiter.admit(alice, stream=True)
        assert (second.headers["RateLimit-Remaining"], second.headers["RateLimit-Reset"]) == (
            "0",
            "30",
        )
        now[0] += 29.5
        with pytest.raises(RateLimited) as refused:
            await limiter.admit(alice)
        assert refused.value.headers()["Retry-After"] == "1"
        now[0] += 1  # the first admission left the window
        second.refund()  # a refund frees its stream; the request itself stays counted
        assert (await limiter.admit(alice, stream=True)).headers["RateLimit-Remaining"] == "0"
        assert limiter.book.unflushed(1, date(2026, 12, 1)) == 2

    asyncio.run(scenario())
