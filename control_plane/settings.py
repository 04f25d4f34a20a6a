"""Configuration from the environment (MLCP_ prefix); the README's Configuration lists it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from benchmarker.settings import BenchmarkerSettings

if TYPE_CHECKING:
    from control_plane.http_guard import HttpLimits


class Settings(BenchmarkerSettings):
    """Every knob of the control plane (the benchmarker's included); tests build one directly."""

    model_config = SettingsConfigDict(env_prefix="MLCP_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # gRPC for handler APIs with a .proto, on `host` like HTTP; 0: any free port (tests).
    grpc_port: int = Field(default=8081, ge=0, le=65535)
    # The largest gRPC request or reply relayed (grpcio answers RESOURCE_EXHAUSTED beyond it).
    grpc_max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=2**31 - 1)
    admin_key: SecretStr | None = None
    # Signs dashboard session cookies; set it on every control plane of a deployment so they accept
    # each other's sessions. Unset: a random secret per process.
    session_secret: SecretStr | None = None
    # The Ray cluster the `ray` runtime places instances on (its GCS, `host:port`, as `ray start
    # --head` prints it); unset, the RAY_ADDRESS variable's, else 127.0.0.1:6379.
    ray_address: str | None = None
    # How often the control plane reads Ray's node table (devices, lost nodes).
    ray_nodes_refresh_s: float = Field(default=2.0, gt=0)
    default_expiration_s: int = Field(default=1800, ge=1, le=2_592_000)
    # Expiry of instances the OpenAI-compatible routes, /chat and async requests load on demand.
    on_demand_expiration_s: int = Field(default=300, ge=1, le=2_592_000)
    # The model `POST /chat` runs when the body names none; unset, the only running one.
    default_model: str | None = None
    # Record request metrics for /metrics (MLCP_METRICS=false turns recording off).
    metrics: bool = True
    # The `node` label of this control plane's metrics; unset, host:port.
    node_name: str | None = None

    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # Client limits (control_plane/http_guard.py): a request's line, headers and body must all
    # arrive within request_timeout_s of its first byte; a new connection may stay silent for
    # idle_timeout_s (and idle between requests as long); beyond max_connections open
    # connections a new one is answered 503.
    request_timeout_s: float = Field(default=10.0, gt=0)
    idle_timeout_s: float = Field(default=5.0, gt=0)
    max_header_bytes: int = Field(default=16_384, ge=1024)
    max_connections: int = Field(default=1024, ge=1)
    # How long a verified key is trusted without asking the database again: keeps a PostgreSQL
    # round trip (~0.5 ms measured) off every proxied request; revocation through this control
    # plane clears it at once.
    auth_cache_s: float = Field(default=5.0, ge=0)
    # While the database is unreachable, keys verified this recently are still served, so
    # running instances keep answering through an outage; unknown keys get 503.
    auth_stale_s: float = Field(default=300.0, ge=0)
    catalog_refresh_s: float = Field(default=60.0, gt=0)
    # Requests an instance holds waiting beyond `concurrency`; more get 503 + Retry-After at once.
    max_queue: int = Field(default=8, ge=0, le=1024)
    # Fixed limit for an instance to become healthy; unset, it grows with the model's size.
    start_timeout_s: float | None = Field(default=None, gt=0)
    # Host memory admission may hand out; unset, the machine's total (a setting so tests and
    # shared hosts can declare less).
    host_memory_bytes: int | None = Field(default=None, gt=0)
    use_gpus: bool = True
    # Where the built-in benchmark worker measures models: `auto` (cuda:0 on a GPU host, so
    # models get the `cuda` profile GPU placement needs; else cpu), `cpu`, `cuda:N`.
    benchmark_device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Stop running instances when the control plane exits. Off: a restart is not a stop, the next
    # start adopts them (reconciliation).
    stop_instances_on_exit: bool = False
    # An instance no control plane renews (every health check renews it) exits by itself this
    # long after the last renewal, or at its expiry if that is later (instance_agent/lease.py).
    instance_lease_grace_s: float = Field(default=300.0, ge=1)
    # A request to an instance that has stopped answering health checks for this long ends
    # with 504 (the instance is killed after 3 missed checks, ~15 s).
    progress_timeout_s: float = Field(default=5.0, gt=0)
    # The docker runtime's agent image: `make image` builds it offline, the Dockerfile with a
    # registry. "bridge" publishes each agent's port on 127.0.0.1 only; "host" shares the host's
    # network (for engines without a bridge, such as CI's).
    docker_image: str = "mlcp-agent:latest"
    docker_network: Literal["bridge", "host"] = "bridge"
    # Warm containers whose agent has torch imported, claimed by catalog models' CPU instances
    # (control_plane/runtimes/docker.py); 0: every instance starts a fresh container.
    docker_spares: int = Field(default=1, ge=0, le=8)

    @property
    def http_limits(self) -> HttpLimits:
        from control_plane.http_guard import HttpLimits

        return HttpLimits(
            idle_s=self.idle_timeout_s,
            receipt_s=self.request_timeout_s,
            max_header_bytes=self.max_header_bytes,
            max_connections=self.max_connections,
        )

    # Per-key limits of user keys that set none of their own (PATCH /admin/keys/{id}); 0 is
    # unlimited. Admin and metrics keys are limited only by what is set on them.
    default_monthly_calls: int = Field(default=0, ge=0, le=1_000_000_000)
    default_rpm: int = Field(default=0, ge=0, le=100_000)
    default_concurrent_streams: int = Field(default=0, ge=0, le=10_000)
    default_max_apis: int = Field(default=0, ge=0, le=10_000)
    default_max_instances: int = Field(default=0, ge=0, le=10_000)
    # A control plane reserves a key's monthly calls from PostgreSQL in blocks of at most this
    # many (and at most a quarter of what is left) and spends them in memory; it holds at most
    # this many of a key's calls unserved, the accuracy bound of the monthly quota per node.
    quota_block_calls: int = Field(default=50, ge=1, le=10_000)

    # Async requests: finished ones are kept this long; a holder that stops heartbeating for
    # `async_lease_s` loses its requests to another control plane; `async_workers` run at once
    # per control plane; a key may have `async_max_queued` unfinished (more get 429).
    async_retention_s: int = Field(default=604_800, ge=1)
    async_lease_s: float = Field(default=10.0, gt=0)
    async_workers: int = Field(default=8, ge=1, le=256)
    async_max_queued: int = Field(default=1000, ge=1)
    # Uploads (`POST /v1/input/upload-url`): a signed URL stays valid this long; a file may be
    # at most `max_upload_bytes`, counted while it streams in (Content-Length is not trusted).
    upload_url_expiry_s: int = Field(default=3600, ge=1, le=604_800)
    max_upload_bytes: int = Field(default=1 << 30, ge=1)
    # A deployed handler project (PUT /apis/{name}: its code, unpacked) and each of its weight
    # files (PUT /apis/blobs/{sha256}) may be at most this large, counted while they stream in.
    max_project_bytes: int = Field(default=2 << 30, ge=1)
    # A weight blob no version links any more is removed once nobody has asked for it or
    # uploaded it for this long (a deploy asks for its blobs before it sends the project).
    blob_grace_s: float = Field(default=3600.0, ge=0)
    # Hosts webhooks may be sent to, comma-separated: names matched exactly, IP addresses or
    # CIDR blocks matched against literal addresses. Default loopback only, so a key cannot make
    # the service call an arbitrary host (SSRF).
    webhook_allow: str = "127.0.0.1,::1,localhost"
    # A delivery is tried this many times, waiting backoff, 2x, 4x, ... (at most 5 min) between
    # attempts; an attempt gets no answer after webhook_timeout_s.
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)
    webhook_backoff_s: float = Field(default=1.0, gt=0, le=300)
