"""The nodes of a cluster as admission sees them: the node table, their devices, lost nodes.

Pure functions over Ray's node table (`ray.nodes()`); device names are device_names.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from benchmarker.ray_measure import node_entries
from control_plane.device_names import HOST_DEVICE, node_of, on_node
from control_plane.placement import Device

# The reason of an instance whose node died.
NODE_LOST = "node lost"


@dataclass(frozen=True)
class Node:
    """One node of the cluster as its node table says."""

    node_id: str
    address: str
    alive: bool
    memory_bytes: int  # what Ray grants actors on it (its `memory` resource)
    gpus: int
    # GPU index → total bytes, from NVML on the node; empty where no probe ran.
    gpu_bytes: dict[int, int] = field(default_factory=dict)

    def devices(self) -> list[Device]:
        out = [Device(on_node(HOST_DEVICE, self.node_id), self.memory_bytes)]
        for index in range(self.gpus):
            total = self.gpu_bytes.get(index)
            if total:
                out.append(Device(on_node(f"cuda:{index}", self.node_id), total))
        return out


def parse_node_table(entries: Iterable[Mapping[str, Any]]) -> list[Node]:
    """Nodes from `ray.nodes()`'s entries; malformed entries are left out."""
    return [
        Node(e.node_id, e.address, e.alive, e.memory_bytes, e.gpus) for e in node_entries(entries)
    ]


def cluster_devices(nodes: Iterable[Node]) -> list[Device]:
    """Every device of every live node."""
    return [d for n in nodes if n.alive for d in n.devices()]


def lost(device: str, nodes: Iterable[Node]) -> bool:
    """Whether the node `device` is on is gone: dead in the table, or no longer in it.

    A device of no node (a one-host instance) is never lost; an empty table (not read yet)
    says nothing.
    """
    node = node_of(device)
    table = {n.node_id: n.alive for n in nodes}
    if node is None or not table:
        return False
    return not table.get(node, False)
