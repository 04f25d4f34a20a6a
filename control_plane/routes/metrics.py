"""GET /metrics: Prometheus text format, for an admin key or a key with the `metrics` scope.

Prometheus sends its key as `Authorization: Bearer <key>` (a scrape config's `authorization`).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from control_plane import capacity as readings
from control_plane.auth import Principal
from control_plane.handlers import authed
from control_plane.lifecycle import State
from control_plane.metrics import gauge
from control_plane.reaper import STALE_ACTIVITY_S
from control_plane.state import AppState
from db import queries

_LIVE = (State.STARTING, State.RUNNING)


async def snapshot(state: AppState) -> list[Metric]:
    """The families read at scrape time: database counts, live instances, device memory."""
    node = state.metrics.node
    instances = gauge("mlcp_instances", "Instances by state", ["node", "state"])
    jobs = gauge("mlcp_jobs", "Benchmark jobs by state", ["node", "state"])
    evictions = CounterMetricFamily(
        "mlcp_evictions", "Instances evicted, by reason", labels=["node", "reason"]
    )
    counts: dict[str, dict[str, int]] = {f: {} for f in ("instances", "jobs", "evictions")}
    for family, label, n in await queries.metrics_counts(state.pool):
        counts[family][label] = n
    for name in State:
        instances.add_metric([node, str(name)], counts["instances"].get(str(name), 0))
    for job_state in ("queued", "benchmarking", "available", "failed"):
        jobs.add_metric([node, job_state], counts["jobs"].get(job_state, 0))
    for reason, n in sorted(counts["evictions"].items()):
        evictions.add_metric([node, reason], n)

    labels = ["node", "model", "instance"]
    in_flight = gauge("mlcp_instance_requests_running", "Requests in flight per instance", labels)
    queued = gauge("mlcp_instance_requests_waiting", "Requests queued per instance", labels)
    held = await queries.reservations(state.pool, STALE_ACTIVITY_S)
    for row in held:
        if row.state not in _LIVE:
            continue
        key = [node, row.model, str(row.id)]
        in_flight.add_metric(key, row.in_flight)
        queued.add_metric(key, state.supervisor.queued.get(row.id, 0))

    reserved = gauge("mlcp_memory_reserved_bytes", "Memory reserved per device", ["node", "device"])
    free = gauge("mlcp_memory_free_bytes", "Memory observed free per device", ["node", "device"])
    for reading in readings.observe(state.settings.host_memory_bytes, state.settings.use_gpus):
        mine = sum(r.reserved_bytes for r in held if r.device == reading.device)
        reserved.add_metric([node, reading.device], mine)
        free.add_metric([node, reading.device], reading.free_bytes)
    return [instances, jobs, evictions, in_flight, queued, reserved, free]


@authed("metrics")
async def metrics(request: Request, state: AppState, principal: Principal) -> Response:
    """Every mlcp_ family, in Prometheus' text exposition format."""
    body = state.metrics.render(await snapshot(state))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes = [Route("/metrics", metrics, methods=["GET"])]
