"""The one load path's plan as a table over data: what a /model/load of a model does now.

Each row: the model's memory need, the reservations held, the flags of the load, and the plan
that the dry run shows and the real call carries out.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.admission import Admission, plan_body
from control_plane.placement import (
    Device,
    Evict,
    Fit,
    Full,
    LoadPlan,
    NeverFits,
    NotMeasured,
    Place,
    QueueBenchmark,
    Reservation,
    Retune,
    Stopping,
    plan_load,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GB = 1_000_000_000
HOST = [Device("cpu", 10 * GB)]  # 9 GB usable after the 10% margin
MODEL = "org/target"


def res(
    id_: int, model: str, gb: float, *, in_flight: int = 0, state: str = "RUNNING"
) -> Reservation:
    return Reservation(
        id_, model, "cpu", int(gb * GB), in_flight, NOW - timedelta(seconds=60), 3.0, state
    )


def kind(plan: LoadPlan) -> str:
    """The plan in one word, as the table below names it."""
    if isinstance(plan, Retune):
        if plan.decision is None:
            return "loaded"
        return "grow-" + kind(Place(plan.decision))
    if isinstance(plan, Place):
        d = plan.decision
        return {Fit: "fits", Evict: "evict", NeverFits: "never_fits", Full: "full"}[type(d)]
    return {Stopping: "stopping", QueueBenchmark: "queue", NotMeasured: "not_measured"}[type(plan)]


CASES = [
    # (name, need GB or None, held, benchmark, dry_run, expected)
    ("fits on an empty host", 1, [], False, False, "fits"),
    ("fits beside others", 2, [res(1, "org/a", 3)], False, False, "fits"),
    ("evicts an idle instance", 4, [res(1, "org/a", 3), res(2, "org/b", 3)], False, False, "evict"),
    ("never fits", 12, [], False, False, "never_fits"),
    ("full: everything busy", 4, [res(1, "org/a", 6, in_flight=1)], False, False, "full"),
    ("loaded: no more memory needed", 1, [res(7, MODEL, 1)], False, False, "loaded"),
    ("loaded: dry run", 1, [res(7, MODEL, 1)], False, True, "loaded"),
    ("grow in place", 2, [res(7, MODEL, 1)], False, False, "grow-fits"),
    ("grow by evicting", 5, [res(7, MODEL, 1), res(1, "org/a", 7)], False, False, "grow-evict"),
    (
        "grow, dry run, shows eviction",
        5,
        [res(7, MODEL, 1), res(1, "org/a", 7)],
        False,
        True,
        "grow-evict",
    ),
    ("grow beyond the device", 10, [res(7, MODEL, 1)], False, False, "grow-never_fits"),
    (
        "grow while others are busy",
        5,
        [res(7, MODEL, 1), res(1, "org/a", 7, in_flight=2)],
        False,
        False,
        "grow-full",
    ),
    (
        "the model's instance is stopping",
        1,
        [res(7, MODEL, 1, state="STOPPING")],
        False,
        False,
        "stopping",
    ),
    ("not measured", None, [], False, False, "not_measured"),
    ("not measured, benchmark first", None, [], True, False, "queue"),
    ("not measured, dry run never queues", None, [], True, True, "not_measured"),
]


@pytest.mark.parametrize(
    ("need_gb", "held", "benchmark", "dry_run", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_plan(
    need_gb: float | None,
    held: list[Reservation],
    benchmark: bool,
    dry_run: bool,
    expected: str,
) -> None:
    need = None if need_gb is None else int(need_gb * GB)
    plan = plan_load(MODEL, need, HOST, held, NOW, benchmark=benchmark, dry_run=dry_run)
    assert kind(plan) == expected


def test_growth_never_evicts_the_instance_itself_nor_places_elsewhere() -> None:
    gpu = Device("cuda:0", 80 * GB)
    held = [res(7, MODEL, 1), res(1, "org/a", 7)]
    plan = plan_load(MODEL, 5 * GB, [*HOST, gpu], held, NOW)
    assert isinstance(plan, Retune) and isinstance(plan.decision, Evict)
    assert plan.decision.device == "cpu"  # its own device, though the GPU has room
    assert [v.instance_id for v in plan.decision.victims] == [1]


def test_dry_run_body_of_a_loaded_model_shows_the_real_plan() -> None:
    held = [res(7, MODEL, 1), res(1, "org/a", 7)]
    plan = plan_load(MODEL, 5 * GB, HOST, held, NOW, dry_run=True)
    body = plan_body(MODEL, 4, Admission(plan, 5 * GB))
    assert body["dryRun"] is True and body["loaded"] is True
    assert body["decision"] == "evict" and body["device"] == "cpu"
    assert [e["model"] for e in body["evictions"]] == ["org/a"]

    unchanged = plan_load(MODEL, GB, HOST, [res(7, MODEL, 1)], NOW, dry_run=True)
    body = plan_body(MODEL, 1, Admission(unchanged, GB))
    assert body["decision"] == "loaded" and body["evictions"] == []

    grows = plan_load(MODEL, 2 * GB, HOST, [res(7, MODEL, 1)], NOW, dry_run=True)
    assert plan_body(MODEL, 2, Admission(grows, 2 * GB))["decision"] == "grow"

    busy = [res(7, MODEL, 1), res(1, "org/a", 7, in_flight=1)]
    full = plan_load(MODEL, 5 * GB, HOST, busy, NOW, dry_run=True)
    body = plan_body(MODEL, 4, Admission(full, 5 * GB))
    assert body["decision"] == "full" and body["retryAfterSeconds"] > 0


def test_a_rollover_places_a_second_instance_beside_the_live_one() -> None:
    # An API redeployed: its live instance (4 GB) is held like any other's.
    held = [res(7, MODEL, 4)]
    beside = plan_load(MODEL, 4 * GB, HOST, held, NOW, beside=True)
    assert kind(beside) == "fits" and isinstance(beside, Place)
    assert beside.decision == Fit("cpu", 1 * GB)
    # Not enough for both: the plan would evict the live instance itself, which the rollover
    # refuses (admission places only a fit beside it), so it stops it first instead.
    tight = plan_load(MODEL, 6 * GB, HOST, held, NOW, beside=True)
    assert isinstance(tight, Place) and isinstance(tight.decision, Evict)
    assert [v.instance_id for v in tight.decision.victims] == [7]
    # Without `beside`, the same load is the live instance's (retuned, never a second one).
    assert kind(plan_load(MODEL, 4 * GB, HOST, held, NOW)) == "loaded"


def test_during_a_rollover_a_load_is_the_newest_instances() -> None:
    # The previous version drains (STOPPING) beside the new one (RUNNING): a load retunes the
    # new one instead of answering that the model is stopping.
    held = [res(7, MODEL, 1, state="STOPPING"), res(9, MODEL, 1)]
    plan = plan_load(MODEL, GB, HOST, held, NOW)
    assert isinstance(plan, Retune) and plan.live.instance_id == 9
    assert plan_load(MODEL, GB, HOST, list(reversed(held)), NOW) == plan
    # Only its own newest instance stopping makes the load wait.
    assert kind(plan_load(MODEL, GB, HOST, [res(9, MODEL, 1, state="STOPPING")], NOW)) == "stopping"
