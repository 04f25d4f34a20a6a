"""A real multi-node Ray cluster on loopback for the tests marked `ray` (module fixture).

`ray.cluster_utils.Cluster` starts a head and a second node as real raylets on 127.0.0.1, each
with a small declared `memory` (what admission sees as the node's host memory), one CPU and an
80 MB object store, so the cluster fits beside everything else on a 2-core box. Nodes die fast
(health checks every 0.5 s, 2 missed) so "node lost" tests take seconds. The test process is a
driver too (it kills actors and removes nodes); the control planes it serves share that
connection. After each test every actor left in the `mlcp` namespace is killed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

GiB = 1 << 30
OBJECT_STORE_BYTES = 80 * 1024 * 1024
HEAD_MEMORY = 2 * GiB
SECOND_MEMORY = 2 * GiB
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RayCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    address: str
    head_id: str
    second_id: str

    def add_node(self, memory_bytes: int) -> Any:
        node = self.cluster.add_node(
            node_ip_address="127.0.0.1",
            num_cpus=1,
            memory=memory_bytes,
            object_store_memory=OBJECT_STORE_BYTES,
        )
        self.cluster.wait_for_nodes()
        return node

    def remove_node(self, node: Any) -> None:
        """Kill the node's raylet (a crash, not a drain)."""
        self.cluster.remove_node(node, allow_graceful=False)


# Per module, not per session: its raylets, workers and this process's driver connection are
# gone before the rest of the suite runs (a 2-core, 24 GiB box runs the whole suite).
@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    import ray
    from ray.cluster_utils import Cluster

    from control_plane.runtimes.ray import RayRuntime

    # Raylets and their workers inherit this: they import the actor from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "node_ip_address": "127.0.0.1",
            "num_cpus": 1,
            "memory": HEAD_MEMORY,
            "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False,
            "_system_config": {
                "health_check_failure_threshold": 2,
                "health_check_period_ms": 500,
                "health_check_initial_delay_ms": 0,
            },
        },
        shutdown_at_exit=False,
    )
    try:
        second = cluster.add_node(
            node_ip_address="127.0.0.1",
            num_cpus=1,
            memory=SECOND_MEMORY,
            object_store_memory=OBJECT_STORE_BYTES,
        )
        cluster.wait_for_nodes()
        RayRuntime(cluster="tests", address=cluster.address).connect()
        yield RayCluster(cluster, cluster.address, cluster.head_node.node_id, second.node_id)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def ray_nodes(ray_cluster: RayCluster) -> Iterator[RayCluster]:
    """The module's cluster; every mlcp actor a test left is killed after it."""
    import ray

    yield ray_cluster
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == "mlcp":
            try:
                ray.kill(ray.get_actor(entry["name"], namespace="mlcp"), no_restart=True)
            except ValueError:
                continue
