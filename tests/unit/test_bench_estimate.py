"""Pure decisions of the benchmarker: memory figures, backoff, failure kinds, job answers."""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from benchmarker import LoadFailed, NeedsRemoteCode, OutOfMemory, UnsafeWeights
from benchmarker.estimate import (
    SAFETY_MARGIN,
    Phase,
    Profile,
    cumulative,
    phases_json,
    ram_for_concurrency,
    required_ram_bytes,
    with_margin,
)
from benchmarker.measure import classify_exit, device_kind, scrub_paths
from benchmarker.worker import BACKOFF_MAX_S, retry_delay_s
from control_plane.jobs import (
    FAILED_JOB_HOLD_S,
    MESSAGE_AVAILABLE,
    MESSAGE_QUEUED,
    failure_stands,
    render_job,
)
from db.rows import ModelJobRow

MB = 1_000_000


def profile(*points: tuple[int, int]) -> Profile:
    phases = [Phase(c, mem, None, 10 * c, 1.0) for c, mem in points]
    return Profile("cpu", 1.0, 100 * MB, cumulative(phases))


def test_cumulative_peaks_never_decrease_and_sort_by_concurrency() -> None:
    phases = cumulative(
        [
            Phase(4, 390 * MB, 5, 40, 1.0),
            Phase(1, 400 * MB, None, 10, 1.0),
            Phase(2, 380 * MB, 7, 20, 1.0),
        ]
    )
    assert [p.concurrency for p in phases] == [1, 2, 4]
    assert [p.peak_rss_bytes for p in phases] == [400 * MB] * 3
    assert [p.peak_gpu_bytes for p in phases] == [None, 7, 7]
    assert [p.tokens for p in phases] == [10, 20, 40]


def test_required_ram_is_the_concurrency_one_peak_plus_the_margin() -> None:
    p = profile((1, 400 * MB), (2, 420 * MB), (4, 460 * MB))
    assert required_ram_bytes(p) == with_margin(400 * MB)
    assert 400 * MB < required_ram_bytes(p) <= 400 * MB * (1 + SAFETY_MARGIN) + 1


def test_ram_for_concurrency_interpolates_and_extrapolates() -> None:
    p = profile((1, 400 * MB), (2, 420 * MB), (4, 460 * MB))
    assert ram_for_concurrency(p, 1) == with_margin(400 * MB)
    assert ram_for_concurrency(p, 3) == with_margin(440 * MB)
    assert ram_for_concurrency(p, 8) == with_margin(540 * MB)
    assert ram_for_concurrency(profile((1, 400 * MB)), 8) == with_margin(400 * MB)


def test_a_profile_without_phases_is_refused() -> None:
    with pytest.raises(ValueError):
        required_ram_bytes(Profile("cpu", 1.0, 1, ()))


def test_phases_json_holds_throughput() -> None:
    [row] = phases_json(profile((1, 400 * MB)))
    assert row["concurrency"] == 1 and row["peakRssBytes"] == 400 * MB
    assert row["tokensPerSecond"] == 10.0


def test_backoff_doubles_up_to_a_cap() -> None:
    delays = [retry_delay_s(n) for n in range(1, 12)]
    assert delays[:3] == [10.0, 20.0, 40.0]
    assert delays == sorted(delays) and delays[-1] == BACKOFF_MAX_S


def test_device_kind() -> None:
    assert device_kind("cpu") == "cpu"
    assert device_kind("cuda:1") == "cuda"


@pytest.mark.parametrize(
    ("line", "returncode", "kind"),
    [
        ("mlcp-agent: load failed: /m/x holds only pickle weights (a.bin)", 3, UnsafeWeights),
        (
            "mlcp-agent: load failed: ValueError: The checkpoint you are trying to load has "
            "model type `evil` but Transformers does not recognize this architecture.",
            3,
            NeedsRemoteCode,
        ),
        ("mlcp-agent: load failed: RuntimeError: CUDA out of memory", 3, OutOfMemory),
        ("mlcp-agent: load failed: MemoryError: ", 3, OutOfMemory),
        ("some unrelated line", -signal.SIGKILL, OutOfMemory),
        (
            "mlcp-agent: load failed: OSError: bad header in /secret/dir/model.safetensors",
            3,
            LoadFailed,
        ),
        ("Traceback ...", 1, LoadFailed),
    ],
)
def test_classify_exit(line: str, returncode: int, kind: type[Exception]) -> None:
    error = classify_exit("org/m", returncode, ["starting", line])
    assert type(error) is kind
    assert "/secret" not in error.message


def test_scrub_paths_keeps_only_the_last_component() -> None:
    assert scrub_paths("no file /a/b/c/model.safetensors here") == "no file model.safetensors here"
    # A path relative to the project says where in it; only absolute ones are cut.
    assert (
        scrub_paths("importing src/main.py failed: /srv/apis/alice/x/src/main.py")
        == "importing src/main.py failed: main.py"
    )


def job(state: str, **fields: object) -> ModelJobRow:
    now = datetime(2024, 5, 28, 0, 12, 18, 738_000, tzinfo=UTC)
    values: dict[str, object] = {
        "id": 1,
        "model": "org/m",
        "state": state,
        "error_code": None,
        "reason": None,
        "attempts": 0,
        "max_attempts": 3,
        "run_after": now,
        "lease_token": None,
        "worker_id": None,
        "heartbeat_at": None,
        "started_at": None,
        "finished_at": None,
        "created_at": now,
        "modified_at": now,
    }
    values.update(fields)
    return ModelJobRow(**values)  # type: ignore[arg-type]


def test_render_queued_job() -> None:
    assert render_job("org/m", job("queued")) == {
        "model": "org/m",
        "success": True,
        "message": MESSAGE_QUEUED,
        "startTime": None,
        "endTime": None,
        "modified": "2024-05-28T00:12:18.738Z",
    }


def test_render_benchmarking_available_and_failed_jobs() -> None:
    start = datetime(2024, 5, 28, 0, 0, 0, tzinfo=UTC)
    end = start + timedelta(seconds=9)
    running = render_job("org/m", job("benchmarking", started_at=start, lease_token=uuid.uuid4()))
    assert running["message"] == MESSAGE_QUEUED
    assert running["startTime"] == "2024-05-28T00:00:00.000Z"
    assert running["endTime"] is None
    done = render_job("org/m", job("available", started_at=start, finished_at=end))
    assert (done["success"], done["message"], done["endTime"]) == (
        True,
        MESSAGE_AVAILABLE,
        "2024-05-28T00:00:09.000Z",
    )
    failed = render_job("org/m", job("failed", reason="Out of memory", finished_at=end))
    assert (failed["success"], failed["message"]) == (False, "Out of memory")


def test_a_failure_stands_for_the_hold_period() -> None:
    end = datetime(2024, 5, 28, tzinfo=UTC)
    failed = job("failed", finished_at=end)
    assert failure_stands(failed, end + timedelta(seconds=FAILED_JOB_HOLD_S - 1))
    assert not failure_stands(failed, end + timedelta(seconds=FAILED_JOB_HOLD_S))
