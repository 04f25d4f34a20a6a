"""GET /capacity (admin): each device's memory, what instances reserve, and what is free."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from control_plane import capacity as readings
from control_plane.auth import Principal
from control_plane.cluster import ray_runtime
from control_plane.device_names import HOST_DEVICE, host_of, local_of, node_of
from control_plane.handlers import authed
from control_plane.placement import Device
from control_plane.reaper import STALE_ACTIVITY_S
from control_plane.state import AppState
from db import queries


@authed("admin")
async def capacity(request: Request, state: AppState, principal: Principal) -> Response:
    """Devices with total, usable, reserved and observed-free bytes, and their instances."""
    return JSONResponse({"devices": await device_report(state)})


async def device_report(state: AppState) -> list[dict[str, Any]]:
    """Each device's memory and the instances holding some of it (also the dashboard's page)."""
    ray = ray_runtime(state)
    if ray is None:
        observed = readings.observe(state.settings.host_memory_bytes, state.settings.use_gpus)
    else:
        # Every node's, as Ray's node table said at the last refresh (free: what Ray grants).
        observed = [
            readings.Observed(d.name, d.total_bytes, d.total_bytes) for d in await ray.devices()
        ]
    held = await queries.reservations(state.pool, STALE_ACTIVITY_S)
    devices: list[dict[str, Any]] = []
    for reading in observed:
        on_host = local_of(reading.device) == HOST_DEVICE
        # The host also holds what instances on GPUs (of its node) reserved beside their VRAM.
        mine = [
            r
            for r in held
            if r.device == reading.device
            or (on_host and r.host_reserved_bytes and host_of(r.device) == reading.device)
        ]
        reserved = sum(
            r.reserved_bytes if r.device == reading.device else r.host_reserved_bytes for r in mine
        )
        usable = Device(reading.device, reading.total_bytes).usable_bytes
        devices.append(
            {
                "device": reading.device,
                "node": node_of(reading.device),
                "totalBytes": reading.total_bytes,
                "usableBytes": usable,
                "reservedBytes": reserved,
                "availableBytes": max(0, usable - reserved),
                "observedFreeBytes": reading.free_bytes,
                "instances": [
                    {
                        "model": r.model,
                        "status": r.state,
                        "device": r.device,
                        "reservedBytes": (
                            r.reserved_bytes
                            if r.device == reading.device
                            else r.host_reserved_bytes
                        ),
                        "inFlight": r.in_flight,
                    }
                    for r in mine
                ],
            }
        )
    return devices


routes = [Route("/capacity", capacity, methods=["GET"])]
