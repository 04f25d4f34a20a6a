"""The cluster as admission sees it (MLCP_RUNTIME=ray): its devices, and nodes that are lost.

`watch_nodes` runs on a schedule: it reads Ray's node table, so admission places on the nodes
that are there now, and moves every live instance of a node that died to FAILED with the
reason "node lost", which releases its reservation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from control_plane import capacity
from control_plane.device_names import node_of
from control_plane.errors import MlcpError
from control_plane.lifecycle import State
from control_plane.nodes import lost
from control_plane.placement import Device
from control_plane.runtimes.base import Runtime
from control_plane.state import AppState
from db import queries

if TYPE_CHECKING:
    # Only a deployment on Ray imports Ray (build_runtime does).
    from control_plane.runtimes.ray import RayRuntime

logger = logging.getLogger(__name__)


def ray_runtime_of(runtime: Runtime) -> RayRuntime | None:
    return cast("RayRuntime", runtime) if runtime.name == "ray" else None


def ray_runtime(state: AppState) -> RayRuntime | None:
    return ray_runtime_of(state.supervisor.runtime)


def ray_benchmark_device(setting: str, use_gpus: bool, ray: RayRuntime) -> str:
    """Where jobs measure on a Ray cluster: `auto` is a GPU where some node has one."""
    if setting != "auto":
        return setting
    return "cuda:0" if use_gpus and any(n.alive and n.gpu_bytes for n in ray.nodes) else "cpu"


async def admission_devices(state: AppState) -> list[Device]:
    """The devices a load may be placed on: every node's with Ray, else this host's."""
    ray = ray_runtime(state)
    if ray is not None:
        return await ray.devices()
    settings = state.settings
    return capacity.devices(capacity.observe(settings.host_memory_bytes, settings.use_gpus))


async def watch_nodes(state: AppState) -> list[int]:
    """One pass: refresh the node table, fail the instances of lost nodes; their ids."""
    ray = ray_runtime(state)
    if ray is None:
        return []
    try:
        nodes = await ray.refresh_nodes()
    except MlcpError as exc:
        logger.warning("could not read the Ray node table: %s", exc.message)
        return []
    failed: list[int] = []
    for row in await queries.live_instances(state.pool):
        if row.state in (State.STARTING, State.RUNNING) and lost(row.device, nodes):
            reason = ray.loss_reason(node_of(row.device))
            logger.warning("instance %s of %s: %s", row.id, row.model, reason)
            await state.supervisor.fail_and_stop(row, reason)
            failed.append(row.id)
    return failed
