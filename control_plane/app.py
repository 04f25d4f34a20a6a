"""The application factory: routes, error handlers and the lifespan on one screen."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect

from benchmarker.ray_measure import RayMeasure
from benchmarker.worker import background_worker
from control_plane import agent_http, deploys, handlers, uploads
from control_plane.activity import Activity
from control_plane.async_worker import async_worker
from control_plane.auth import Authenticator
from control_plane.bootstrap import bootstrap_admin_key, refresh_catalog
from control_plane.capacity import benchmark_device
from control_plane.cluster import ray_benchmark_device, ray_runtime_of
from control_plane.dashboard import routes as dashboard_routes
from control_plane.errors import MlcpError
from control_plane.events import EventHub
from control_plane.fast_lane import LANE_KEY, FastLane
from control_plane.grpc_front import GrpcFront
from control_plane.grpc_services import ServiceTable
from control_plane.metrics import Metrics, RecordRequests
from control_plane.outage import DatabaseOutage, is_outage
from control_plane.quotas import Limiter
from control_plane.reconciler import reconcile_by_database_clock
from control_plane.routes import (
    api_calls,
    apis,
    async_requests,
    capacity,
    chat,
    events,
    instances,
    jobs,
    keys,
    logs,
    models,
    openai,
    usage,
)
from control_plane.routes import health as health_routes
from control_plane.routes import metrics as metrics_routes
from control_plane.routes import uploads as upload_routes
from control_plane.runtimes import build_runtime
from control_plane.runtimes.base import WarmsUp
from control_plane.runtimes.process import ProcessRuntime
from control_plane.scheduler import build_scheduler
from control_plane.sessions import Signer
from control_plane.settings import Settings
from control_plane.state import STATE_KEY, AppState
from control_plane.supervisor import Supervisor
from control_plane.webhook_sender import webhook_sender
from db import queries
from db.database import open_database
from db.pool import create_pool

logger = logging.getLogger(__name__)


def announce_admin_key(secret: str) -> None:
    """Print a generated admin key; it is shown this once and stored only as a hash."""
    print(
        "\n  mlcp: generated the admin API key (shown once, stored only as a hash):\n"
        f"    {secret}\n"
        "  Use it as:  curl -H 'Authorization: Key <key>' ...\n",
        file=sys.stdout,
        flush=True,
    )


async def unless_outage(what: str, write: Callable[..., Awaitable[object]], *args: Any) -> None:
    """A write on the way out that the database may be down for: logged, never a failed exit."""
    try:
        await write(*args)
    except Exception as exc:
        if not is_outage(exc):
            raise
        logger.warning("not written at shutdown (the database is unavailable): %s", what)


def _http_session() -> aiohttp.ClientSession:
    """The session for agents' health checks and webhooks (the relay has its own wire).

    Its keep-alive stays below uvicorn's 5 s in the agent, so the agent never closes a pooled
    connection just as a request is sent on it.
    """
    connector = aiohttp.TCPConnector(
        limit=0, keepalive_timeout=agent_http.KEEPALIVE_S, force_close=False
    )
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
    )


def create_app(settings: Settings) -> Starlette:
    node = settings.node_name or f"{socket.gethostname()}:{settings.port}"
    metrics = Metrics(node, enabled=settings.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, AppState | FastLane]]:
        async with contextlib.AsyncExitStack() as stack:
            dsn = await stack.enter_async_context(open_database(settings))
            pool = await create_pool(dsn)
            stack.push_async_callback(pool.close)
            secret = await bootstrap_admin_key(pool, settings)
            if secret:
                announce_admin_key(secret)
            await refresh_catalog(pool, settings)

            session = _http_session()
            stack.push_async_callback(session.close)
            activity = Activity(node_id=uuid.uuid4().hex)
            runtime = build_runtime(settings, await queries.cluster_id(pool))
            if (ray := ray_runtime_of(runtime)) is not None:
                stack.push_async_callback(ray.close)
                try:
                    await asyncio.to_thread(ray.connect)
                    await ray.refresh_nodes()
                except MlcpError as exc:
                    # Said plainly, then start-up fails: uvicorn exits non-zero.
                    logger.error("mlcp: %s", exc.message)
                    raise
            if isinstance(runtime, WarmsUp):
                # Imports torch in the background (the process runtime's zygote, the docker
                # runtime's spares) so the first load does not wait for it.
                runtime.warm_up()
                stack.push_async_callback(runtime.close)
            supervisor = Supervisor(
                pool,
                runtime,
                session,
                activity,
                settings.model_store,
                max_queue=settings.max_queue,
                start_timeout_s=settings.start_timeout_s,
                stop_on_exit=settings.stop_instances_on_exit,
                lease_grace_s=settings.instance_lease_grace_s,
                progress_timeout_s=settings.progress_timeout_s,
            )
            stack.push_async_callback(supervisor.close)
            event_hub = EventHub(dsn, pool)
            await event_hub.start()
            stack.push_async_callback(event_hub.close)
            outage = DatabaseOutage()
            state = AppState(
                settings,
                pool,
                Authenticator(
                    pool, settings.auth_cache_s, stale_s=settings.auth_stale_s, outage=outage
                ),
                session,
                activity,
                supervisor,
                event_hub,
                Limiter(pool, settings),
                outage,
                Signer(
                    settings.session_secret.get_secret_value().encode()
                    if settings.session_secret
                    else None
                ),
                metrics=metrics,
                upload_secret=await uploads.server_secret(pool),
            )
            supervisor.on_loaded = metrics.loaded
            # Deploys under way are cancelled before the supervisor and the pool close.
            stack.push_async_callback(state.deploys.close)
            await deploys.resume(state)
            # Also on app.state, for tests and tooling that hold the app, not a request.
            app.state.mlcp = state
            await reconcile_by_database_clock(supervisor)
            try:
                state.grpc = GrpcFront(state, ServiceTable())
            except RuntimeError as exc:
                # A taken gRPC port costs the gRPC APIs, not the whole control plane (a second
                # control plane on one host, or MLCP_GRPC_PORT left at its default).
                logger.error("gRPC not served: port %d: %s", settings.grpc_port, exc)
            else:
                await state.grpc.start()
                stack.push_async_callback(state.grpc.stop)
            scheduler = build_scheduler(state)
            scheduler.start()
            stack.push_async_callback(scheduler.aclose)
            # Counters not yet flushed are written before the pool closes, and reserved calls not
            # served are given back for other control planes.
            # During an outage they cannot be: said once each, and the exit goes on.
            stack.push_async_callback(unless_outage, "request counters", activity.flush, pool)
            stack.push_async_callback(
                unless_outage,
                "reserved calls",
                functools.partial(state.limiter.flush, release_all=True),
            )
            # Stops first on the way out: finishes or hands back its job while the pool is open.
            remote_measure: RayMeasure | None = None
            zygote = None
            if ray is None:
                device = benchmark_device(settings.benchmark_device, settings.use_gpus)
                # Measured in a process of the kind its instances run in: forked from the zygote.
                zygote = runtime.zygote if isinstance(runtime, ProcessRuntime) else None
            else:
                # Each job a Ray task on a node of the device kind it measures.
                device = ray_benchmark_device(settings.benchmark_device, settings.use_gpus, ray)
                remote_measure = RayMeasure(
                    command=settings.agent_command, reachable=ray.gcs_reachable
                )
            await stack.enter_async_context(
                background_worker(
                    pool, settings, device=device, zygote=zygote, remote_measure=remote_measure
                )
            )
            # Stops before the supervisor: held requests are handed back while instances serve.
            await stack.enter_async_context(async_worker(state, activity.node_id))
            await stack.enter_async_context(webhook_sender(state))
            # Closed first on the way out: relayed requests still open end with the instances up.
            stack.push_async_callback(state.agents.close)
            yield {STATE_KEY: state, LANE_KEY: lane}

    routes = [
        # /model/run first: Starlette tries routes in order, and it is the hot path.
        *instances.routes,
        *health_routes.routes,
        *models.routes,
        *keys.routes,
        *usage.routes,
        *jobs.routes,
        *logs.routes,
        *capacity.routes,
        *openai.routes,
        *chat.routes,
        *upload_routes.routes,
        *async_requests.routes,
        *events.routes,
        *dashboard_routes,
        *metrics_routes.routes,
        *apis.routes,
        # Last: `/{api}` and `/{owner}/{api}` must never shadow a route above.
        *api_calls.routes,
    ]
    exception_handlers: dict[Any, Any] = {
        MlcpError: handlers.on_mlcp_error,
        HTTPException: handlers.on_http_exception,
        **handlers.DATABASE_HANDLERS,
        ClientDisconnect: handlers.on_client_disconnect,
        Exception: handlers.on_unexpected,
    }
    # The routes that run models, served past the stack below (control_plane/fast_lane.py).
    lane = FastLane(
        routes, exception_handlers, metrics if settings.metrics else None, api_calls.routes
    )
    app = Starlette(
        middleware=[Middleware(RecordRequests, metrics=metrics)] if settings.metrics else [],
        routes=routes,
        exception_handlers=exception_handlers,
        lifespan=lifespan,
    )
    lane.app = app
    return app
