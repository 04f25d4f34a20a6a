"""Device names across the nodes of a cluster (pure, no imports of mlcp).

On one host a device is `cpu` or `cuda:N`. With the Ray runtime it is qualified by the node it
is on, `cpu@<node id>` or `cuda:N@<node id>`: the same string is admission's device, the
instance row's `device` and what the runtime is told, so PostgreSQL's reservation ledger stays
per node without a column of its own.
"""

from __future__ import annotations

SEP = "@"
HOST_DEVICE = "cpu"


def on_node(device: str, node: str | None) -> str:
    """`device` on `node` (`cpu@abc…`); unchanged without a node."""
    return f"{device}{SEP}{node}" if node else device


def split(device: str) -> tuple[str, str | None]:
    """(the device on its node, the node) of `cuda:0@abc…`; (device, None) on one host."""
    local, sep, node = device.partition(SEP)
    return local, (node if sep and node else None)


def local_of(device: str) -> str:
    """`cuda:0` of `cuda:0@abc…`."""
    return split(device)[0]


def node_of(device: str) -> str | None:
    """`abc…` of `cuda:0@abc…`; None on one host."""
    return split(device)[1]


def host_of(device: str) -> str:
    """The host-memory device beside `device`: `cpu` on its node."""
    return on_node(HOST_DEVICE, node_of(device))
