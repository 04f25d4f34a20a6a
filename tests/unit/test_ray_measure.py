"""A job measured as a Ray task: the node it runs on, what it asks Ray for, and the plain data
that crosses between the worker and the task (the real task: tests/integration/test_ray_jobs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarker import (
    HandlerFailed,
    LoadFailed,
    ModelNotFound,
    NeedsRemoteCode,
    OutOfMemory,
    UnsafeWeights,
)
from benchmarker.estimate import Phase, Profile
from benchmarker.measure import Target
from benchmarker.ray_measure import (
    NodeEntry,
    choose_node,
    error_of,
    node_entries,
    profile_json,
    profile_of,
    target_json,
    target_of,
    task_options,
    weights_bytes,
)

GB = 1_000_000_000
A, B, C = "a" * 56, "b" * 56, "c" * 56


def test_node_table_entries() -> None:
    table = [
        {"NodeID": A, "Alive": True, "Resources": {"memory": 2.0 * GB, "CPU": 1.0}},
        {"NodeID": B, "Alive": False, "Resources": {"memory": 8 * GB, "GPU": 2.0}},
        {"Alive": True},  # malformed: no id
        {"NodeID": C, "Alive": True, "Resources": {"memory": "lots"}},  # malformed
    ]
    assert node_entries(table) == [NodeEntry(A, True, 2 * GB, 0), NodeEntry(B, False, 8 * GB, 2)]


def test_cpu_measures_on_the_live_node_with_most_memory_that_holds_the_weights() -> None:
    nodes = [
        NodeEntry(A, True, 2 * GB, 0),
        NodeEntry(B, False, 16 * GB, 0),  # dead
        NodeEntry(C, True, 4 * GB, 1),
    ]
    assert choose_node(nodes, "cpu", 1 * GB) == C
    assert choose_node(nodes, "cpu", 3 * GB) == C
    assert choose_node(nodes, "cpu", 5 * GB) is None
    assert choose_node([NodeEntry(A, True, 2 * GB, 0)], "cpu", 0) == A
    # Equal memory: one answer, whatever the table's order.
    same = [NodeEntry(A, True, 2 * GB, 0), NodeEntry(B, True, 2 * GB, 0)]
    assert choose_node(same, "cpu", 0) == choose_node(list(reversed(same)), "cpu", 0) == B


def test_cuda_measures_only_on_a_node_with_a_gpu() -> None:
    nodes = [NodeEntry(A, True, 32 * GB, 0), NodeEntry(B, True, 4 * GB, 1)]
    assert choose_node(nodes, "cuda", 1 * GB) == B
    assert choose_node(nodes, "cuda", 8 * GB) is None
    assert choose_node([NodeEntry(A, True, 32 * GB, 0)], "cuda", 0) is None


def test_task_options_pin_the_node_and_ask_for_what_the_measurement_needs() -> None:
    cpu = task_options(A, "cpu", 3 * GB)
    assert cpu["num_cpus"] == 1 and cpu["memory"] == 3 * GB and "num_gpus" not in cpu
    assert cpu["max_retries"] == 0 and cpu["retry_exceptions"] is False
    strategy = cpu["scheduling_strategy"]
    assert strategy.node_id == A and strategy.soft is False
    assert "memory" not in task_options(A, "cpu", 0)
    assert task_options(B, "cuda", GB)["num_gpus"] == 1


def test_target_and_profile_cross_as_plain_data() -> None:
    target = Target("org/m", Path("/store/org/m"), "m.gguf", "cuda:0", "/envs/x/bin/python", None)
    data = target_json(target)
    assert all(isinstance(v, str | None) for v in data.values())
    assert target_of(data) == target
    profile = Profile(
        "cpu",
        1.5,
        300_000_000,
        (Phase(1, 400_000_000, None, 24, 0.5), Phase(2, 450_000_000, 7_000_000, 48, 0.7)),
    )
    assert profile_of(profile_json(profile)) == profile


def test_failures_come_back_as_the_same_error_kinds() -> None:
    for cls in (ModelNotFound, UnsafeWeights, NeedsRemoteCode, OutOfMemory, HandlerFailed):
        error = error_of({"code": cls.code, "message": "why"})
        assert type(error) is cls and error.message == "why"
    failed = error_of({"code": "load_error", "message": "Load error: boom"})
    assert type(failed) is LoadFailed and failed.retryable
    assert type(error_of({"code": "something_new", "message": "x"})) is LoadFailed


@pytest.mark.parametrize("gguf", [None, "m.gguf"])
def test_weights_are_the_safetensors_and_the_gguf_file(tmp_path: Path, gguf: str | None) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / "b.safetensors").write_bytes(b"\0" * 50)
    (tmp_path / "m.gguf").write_bytes(b"\0" * 1000)
    (tmp_path / "config.json").write_text("{}")
    target = Target("org/m", tmp_path, gguf)
    assert weights_bytes(target) == (1150 if gguf else 150)
