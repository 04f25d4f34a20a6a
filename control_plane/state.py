"""The typed state the lifespan opens and every handler reaches through `state_of`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from starlette.requests import Request

from control_plane.activity import Activity
from control_plane.agent_http import AgentHttp
from control_plane.auth import Authenticator
from control_plane.events import EventHub
from control_plane.metrics import Metrics
from control_plane.outage import DatabaseOutage
from control_plane.quotas import Limiter
from control_plane.sessions import Signer
from control_plane.settings import Settings
from control_plane.supervisor import Supervisor
from db.async_queries import NewAsyncRequest
from db.pool import Pool
from db.rows import ApiRow, AsyncRequestRow

if TYPE_CHECKING:
    from control_plane.async_queue import GroupCommit
    from control_plane.deploys import Deploys
    from control_plane.grpc_front import GrpcFront

STATE_KEY = "mlcp"


@dataclass
class AppState:
    settings: Settings
    pool: Pool
    auth: Authenticator
    session: aiohttp.ClientSession
    activity: Activity
    supervisor: Supervisor
    events: EventHub
    # Per-key limits and calls per month (control_plane/quotas.py).
    limiter: Limiter
    # Shared by the authenticator, the error handler and the scheduled loops.
    outage: DatabaseOutage = field(default_factory=DatabaseOutage)
    # Signs dashboard session cookies.
    signer: Signer = field(default_factory=Signer)
    # Wakes this control plane's async worker when a request was just stored (else it polls).
    wake_async: Callable[[], None] = lambda: None
    # Stores submitted async requests, a burst in one statement (async_requests.py).
    async_inserts: GroupCommit[NewAsyncRequest, AsyncRequestRow | None] | None = None
    metrics: Metrics = field(default_factory=lambda: Metrics("local", enabled=False))
    # Catalog task by model name, for the routes that check it on every request (/v1/*): a
    # model's task comes from its files and does not change while it has a running instance.
    model_tasks: dict[str, str] = field(default_factory=dict)
    # Signs upload URLs (control_plane/uploads.py); read from the database at start-up.
    upload_secret: bytes = b""
    # The gRPC port's server (MLCP_GRPC_PORT), once the lifespan started it.
    grpc: GrpcFront | None = None
    # Handler API rows by (owner, name), with when each stops being trusted (monotonic s).
    api_cache: dict[tuple[str, str], tuple[ApiRow | None, float]] = field(default_factory=dict)
    # Deploys of handler APIs under way on this control plane (set by the lifespan).
    deploys: Deploys = field(default_factory=lambda: _deploys())
    # The relay's connections to instance agents (control_plane/agent_http.py).
    agents: AgentHttp = field(default_factory=AgentHttp)


def _deploys() -> Deploys:
    from control_plane.deploys import Deploys

    return Deploys()


def state_of(request: Request) -> AppState:
    """The lifespan's state, typed."""
    state: AppState = getattr(request.state, STATE_KEY)
    return state
