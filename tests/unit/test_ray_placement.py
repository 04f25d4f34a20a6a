"""Placement across the nodes of a cluster, Ray's node table and the ray runtime's decisions,
as pure functions (the real cluster is tests/integration/test_ray_runtime.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.device_kind import CPU, CUDA, candidates, choose_kind, hosts, kind_of
from control_plane.device_names import host_of, local_of, node_of, on_node
from control_plane.nodes import NODE_LOST, Node, cluster_devices, lost, parse_node_table
from control_plane.placement import (
    Device,
    Evict,
    Fit,
    Full,
    NeverFits,
    Place,
    Reservation,
    decide_across,
    plan_load,
)
from control_plane.runtimes.base import InstanceSpec
from control_plane.runtimes.ray import (
    KILLED,
    actor_name,
    actor_options,
    death_reason,
    is_loopback,
    parse_actor_name,
    split_address,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GB = 1_000_000_000
A, B, C = "a" * 56, "b" * 56, "c" * 56
# Usable: 10 GB → 9 GB, 4 GB → 3.6 GB, 20 GB → 18 GB.
NODES = [Device(f"cpu@{A}", 10 * GB), Device(f"cpu@{B}", 4 * GB)]


def res(id_: int, gb: float, device: str, *, idle_s: float = 60, busy: int = 0, host_gb: float = 0):  # type: ignore[no-untyped-def]
    return Reservation(
        id_,
        f"org/m{id_}",
        device,
        int(gb * GB),
        busy,
        NOW - timedelta(seconds=idle_s),
        3.0,
        "RUNNING",
        int(host_gb * GB),
    )


def test_device_names_carry_their_node() -> None:
    assert on_node("cuda:1", A) == f"cuda:1@{A}" and on_node("cpu", None) == "cpu"
    assert local_of(f"cuda:1@{A}") == "cuda:1" and node_of(f"cuda:1@{A}") == A
    assert node_of("cuda:1") is None and node_of("cpu@") is None
    assert host_of(f"cuda:1@{A}") == f"cpu@{A}" and host_of("cuda:0") == "cpu"
    assert kind_of(f"cuda:3@{A}") == CUDA and kind_of(f"cpu@{A}") == CPU


def test_cpu_loads_may_go_to_every_nodes_host() -> None:
    assert candidates(CPU, NODES) == (NODES, None)
    assert hosts(NODES) == NODES
    assert choose_kind("auto", NODES, None) == CPU


def test_best_fit_across_nodes_and_never_fits_beyond_the_largest_node() -> None:
    small = decide_across(3 * GB, NODES, [], NOW)
    assert small == Fit(f"cpu@{B}", int(3.6 * GB) - 3 * GB)  # the tighter node
    big = decide_across(5 * GB, NODES, [], NOW)
    assert isinstance(big, Fit) and big.device == f"cpu@{A}"
    # 11 GB: the nodes hold 12.6 GB together, none alone.
    never = decide_across(11 * GB, NODES, [], NOW)
    assert never == NeverFits(9 * GB)


def test_a_node_that_is_full_sends_the_load_to_another() -> None:
    held = [res(1, 3, f"cpu@{B}", busy=1)]
    assert decide_across(3 * GB, NODES, held, NOW) == Fit(f"cpu@{A}", 6 * GB)


def test_a_fit_anywhere_beats_an_eviction_and_busy_everywhere_is_full() -> None:
    idle_on_a = res(1, 8, f"cpu@{A}")
    assert isinstance(decide_across(3 * GB, NODES, [idle_on_a], NOW), Fit)
    both_idle = [idle_on_a, res(2, 3, f"cpu@{B}")]
    evict = decide_across(3 * GB, NODES, both_idle, NOW)
    assert isinstance(evict, Evict) and len(evict.victims) == 1
    busy = [res(1, 8, f"cpu@{A}", busy=1), res(2, 3, f"cpu@{B}", busy=1)]
    full = decide_across(3 * GB, NODES, busy, NOW)
    assert isinstance(full, Full) and full.free_bytes == 1 * GB


def test_a_gpu_reserves_host_memory_on_its_own_node() -> None:
    gpu_a, gpu_b = Device(f"cuda:0@{A}", 20 * GB), Device(f"cuda:0@{B}", 20 * GB)
    devices = [*NODES, gpu_a, gpu_b]
    targets, _ = candidates(CUDA, devices)
    assert targets == [gpu_a, gpu_b]
    # 5 GB of host memory beside the GPU: only node A's host (9 GB) holds it.
    fit = decide_across(10 * GB, targets, [], NOW, hosts=hosts(devices), host_bytes=5 * GB)
    assert fit == Fit(gpu_a.name, 8 * GB)
    # Node A's host is taken by a GPU instance's host memory there: node B is out too.
    held = [res(1, 1, gpu_a.name, host_gb=8, busy=1)]
    full = decide_across(10 * GB, targets, held, NOW, hosts=hosts(devices), host_bytes=5 * GB)
    assert isinstance(full, Full | NeverFits)


def test_plan_load_places_across_nodes() -> None:
    plan = plan_load("org/new", 3 * GB, NODES, [], NOW)
    assert plan == Place(Fit(f"cpu@{B}", int(0.6 * GB)))


def test_one_host_is_unchanged() -> None:
    host = Device("cpu", 10 * GB)
    assert decide_across(3 * GB, [host], [], NOW) == Fit("cpu", 6 * GB)


def test_node_table_and_lost_nodes() -> None:
    table = parse_node_table(
        [
            {
                "NodeID": A,
                "Alive": True,
                "NodeManagerAddress": "127.0.0.1",
                "Resources": {"memory": 10 * GB, "CPU": 1.0},
            },
            {"NodeID": B, "Alive": False, "Resources": {"memory": 4 * GB}},
            {"Alive": True},  # malformed: left out
            {"NodeID": C, "Alive": True, "Resources": {"memory": "lots"}},
        ]
    )
    assert [n.node_id for n in table] == [A, B]
    assert cluster_devices(table) == [Device(f"cpu@{A}", 10 * GB)]
    assert not lost(f"cpu@{A}", table)
    assert lost(f"cpu@{B}", table)  # dead in the table
    assert lost(f"cpu@{C}", table)  # no longer in it
    assert not lost("cpu", table)  # an instance of no node
    assert not lost(f"cpu@{B}", [])  # a table not read yet says nothing
    gpus = Node(A, "127.0.0.1", True, 10 * GB, 2, {0: 80 * GB})
    # A GPU whose memory no probe read is not placed on.
    assert [d.name for d in gpus.devices()] == [f"cpu@{A}", f"cuda:0@{A}"]


def test_actor_names_round_trip_and_foreign_names_are_not_ours() -> None:
    name = actor_name("c1/x", 12, 3)
    assert name == "mlcp-c1-x-12-3"
    assert parse_actor_name("c1/x", name) == (12, 3)
    for other in ("mlcp-c2-12-3", "mlcp-c1-x-12", "mlcp-c1-x-a-3", "something"):
        assert parse_actor_name("c1/x", other) is None


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("The actor died because its node has died. Node Id: abc", NODE_LOST),
        ("The actor is dead because it was killed by `ray.kill`.", KILLED),
        (
            "The actor is not schedulable: The node specified via NodeAffinity...",
            "Ray could not place the instance on the node admission chose",
        ),
        ("\n  Worker crashed\nmore", "the instance's Ray actor died: Worker crashed"),
    ],
)
def test_death_reasons(message: str, reason: str) -> None:
    assert death_reason(message) == reason


def test_addresses() -> None:
    assert split_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert split_address("ray://head.example:10001") == ("head.example", 10001)
    assert split_address("[::1]:6379") == ("::1", 6379)
    for bad in ("nohost", ":6379", "h:0", "h:99999", "h:port"):
        with pytest.raises(ValueError):
            split_address(bad)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("10.1.2.3") and not is_loopback("head.example")


def test_actor_options_pin_and_reserve() -> None:
    spec = InstanceSpec(
        instance_id=1,
        generation=1,
        model="org/m",
        model_dir=__import__("pathlib").Path("/m"),
        gguf_file=None,
        concurrency=1,
        max_queue=1,
        device=f"cuda:1@{A}",
        reserve_bytes=3 * GB,
    )
    options = actor_options("mlcp-x-1-1", spec)
    assert options["memory"] == 3 * GB and options["num_gpus"] == 1
    assert options["lifetime"] == "detached" and options["namespace"] == "mlcp"
    strategy = options["scheduling_strategy"]
    assert strategy.node_id == A and strategy.soft is False
