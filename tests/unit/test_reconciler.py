"""The reconciliation plan as a pure function over rows and what the runtime lists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.reconciler import GONE_REASON, plan
from control_plane.runtimes.base import Listed
from db.rows import InstanceRow

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def row(
    id_: int,
    state: str,
    *,
    generation: int = 1,
    age_s: float = 600,
    seen_s_ago: float | None = None,
) -> InstanceRow:
    created = NOW - timedelta(seconds=age_s)
    seen = None if seen_s_ago is None else NOW - timedelta(seconds=seen_s_ago)
    return InstanceRow(
        id=id_,
        model=f"org/m{id_}",
        state=state,
        reason=None,
        concurrency=1,
        expiration_s=60,
        runtime="process",
        generation=generation,
        endpoint="http://127.0.0.1:1",
        handle="1",
        owner_key_id=None,
        inferences=0,
        last_used_at=created,
        expires_at=NOW,
        observed_mem_bytes=None,
        created_at=created,
        modified_at=created,
        launch_seen_at=seen,
    )


def listed(id_: int, generation: int = 1) -> Listed:
    return Listed(id_, generation, f"h{id_}", "http://127.0.0.1:1")


@pytest.mark.parametrize(
    ("rows", "found", "here", "adopt", "fail", "finish", "remove"),
    [
        ([row(1, "RUNNING")], [listed(1)], set(), [1], [], [], []),
        ([row(1, "RUNNING")], [], set(), [], [1], [], []),
        ([], [listed(5)], set(), [], [], [], ["h5"]),
        ([row(1, "RUNNING", generation=2)], [listed(1, 1)], set(), [], [1], [], ["h1"]),
        ([row(1, "STARTING", age_s=5)], [], set(), [], [], [], []),
        ([row(1, "STARTING", age_s=600)], [], set(), [], [1], [], []),
        # A long launch (a GGUF conversion) whose launcher keeps renewing it is left alone;
        # one whose launcher stopped renewing it is gone, however young the row.
        ([row(1, "STARTING", age_s=600, seen_s_ago=1)], [], set(), [], [], [], []),
        ([row(1, "STARTING", age_s=100, seen_s_ago=90)], [], set(), [], [1], [], []),
        ([row(1, "STARTING")], [], {1}, [], [], [], []),
        ([row(1, "STARTING")], [listed(1)], {1}, [], [], [], []),
        ([row(1, "STARTING")], [listed(1)], set(), [1], [], [], []),
        ([row(1, "STOPPING")], [listed(1)], set(), [], [], [1], []),
        ([row(1, "STOPPING")], [], set(), [], [], [1], []),
        ([row(1, "RUNNING")], [listed(1), listed(1)], set(), [1], [], [], ["h1"]),
    ],
)
def test_plan(
    rows: list[InstanceRow],
    found: list[Listed],
    here: set[int],
    adopt: list[int],
    fail: list[int],
    finish: list[int],
    remove: list[str],
) -> None:
    decided = plan(rows, found, starting_here=here, now=NOW, starting_grace_s=15)
    assert [r.id for r, _ in decided.adopt] == adopt
    assert [r.id for r, _ in decided.fail] == fail
    assert all(reason == GONE_REASON for _, reason in decided.fail)
    assert [r.id for r, _ in decided.finish_stop] == finish
    assert [x.handle for x in decided.remove] == remove
