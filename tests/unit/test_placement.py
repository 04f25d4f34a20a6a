"""Admission decisions as pure functions: fits, evict, never fits, full."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.placement import (
    MARGIN_MIN_BYTES,
    Device,
    Evict,
    Fit,
    Full,
    NeverFits,
    Reservation,
    decide,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GB = 1_000_000_000
HOST = Device("cpu", 10 * GB)  # usable: 9 GB after the 10% margin


def res(
    id_: int,
    gb: float,
    *,
    idle_s: float = 60,
    in_flight: int = 0,
    reload_s: float = 3.0,
    state: str = "RUNNING",
    device: str = "cpu",
) -> Reservation:
    return Reservation(
        id_,
        f"org/m{id_}",
        device,
        int(gb * GB),
        in_flight,
        NOW - timedelta(seconds=idle_s),
        reload_s,
        state,
    )


def victims(decision: object) -> list[int]:
    assert isinstance(decision, Evict), decision
    return [v.instance_id for v in decision.victims]


def test_usable_keeps_a_margin() -> None:
    assert HOST.usable_bytes == 9 * GB
    assert Device("small", GB).usable_bytes == GB - MARGIN_MIN_BYTES


@pytest.mark.parametrize(
    ("need_gb", "reservations", "expected"),
    [
        (1, [], Fit),
        (9, [], Fit),
        (9.5, [], NeverFits),
        (20, [res(1, 1)], NeverFits),
        (4, [res(1, 4)], Fit),
        (4, [res(1, 6)], Evict),
        (4, [res(1, 6, in_flight=1)], Full),
        (4, [res(1, 6, state="STOPPING")], Full),
        (4, [res(1, 6, state="STARTING")], Full),
    ],
)
def test_decision_kinds(need_gb: float, reservations: list[Reservation], expected: type) -> None:
    assert isinstance(decide(int(need_gb * GB), [HOST], reservations, NOW), expected)


def test_evicts_least_recently_used_first_and_only_as_many_as_needed() -> None:
    rs = [res(1, 3, idle_s=10), res(2, 3, idle_s=500), res(3, 3, idle_s=100)]
    assert victims(decide(2 * GB, [HOST], rs, NOW)) == [2]
    assert victims(decide(5 * GB, [HOST], rs, NOW)) == [2, 3]


def test_victims_made_unneeded_by_a_larger_one_are_spared() -> None:
    rs = [res(1, 0.5, idle_s=500), res(2, 5, idle_s=400), res(3, 3, idle_s=10)]
    # Least recently used first takes 1 (0.5 GB) then 2 (5 GB); 2 alone frees enough.
    assert victims(decide(5 * GB, [HOST], rs, NOW)) == [2]
    assert victims(decide(6 * GB, [HOST], rs, NOW)) == [1, 2]


def test_ties_in_idleness_prefer_the_quickest_to_reload() -> None:
    rs = [res(1, 4, reload_s=30), res(2, 4, reload_s=2)]
    assert victims(decide(2 * GB, [HOST], rs, NOW)) == [2]


def test_busy_instances_are_never_evicted() -> None:
    rs = [res(1, 4, in_flight=2, idle_s=9999), res(2, 4, idle_s=1)]
    assert victims(decide(2 * GB, [HOST], rs, NOW)) == [2]
    full = decide(6 * GB, [HOST], rs, NOW)
    assert isinstance(full, Full) and full.retry_after_s > 0


def test_best_fit_picks_the_tightest_device() -> None:
    devices = [Device("cuda:0", 40 * GB), Device("cuda:1", 20 * GB), HOST]
    decision = decide(8 * GB, devices, [], NOW)
    assert isinstance(decision, Fit) and decision.device == "cpu" and decision.headroom_bytes == GB
    decision = decide(12 * GB, devices, [], NOW)
    assert isinstance(decision, Fit) and decision.device == "cuda:1"


def test_eviction_chooses_the_device_with_the_cheapest_plan() -> None:
    devices = [Device("cuda:0", 10 * GB), Device("cuda:1", 10 * GB)]
    rs = [
        res(1, 4, device="cuda:0"),
        res(2, 4, device="cuda:0"),
        res(3, 8, device="cuda:1", reload_s=1.0),
    ]
    decision = decide(6 * GB, devices, rs, NOW)
    assert isinstance(decision, Evict) and decision.device == "cuda:1" and victims(decision) == [3]
