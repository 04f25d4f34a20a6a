"""Prometheus metrics, vLLM-style names under `mlcp_`, every series labelled with this `node`.

Two kinds: what the request path records as it happens (requests by model, route and status,
their duration, time to first token, prompt and generation tokens), kept in this process like
every Prometheus exporter's counters; and what a scrape reads at that moment (instances and jobs
by state, evictions by reason from the database; in-flight and queued per instance; reserved and
free memory per device). Recording is a dict lookup and a locked add per request: the hot path
never touches the database.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Routes are labelled by their template, never by a raw path (unbounded label values).
ROUTES = frozenset(
    {
        "/model/run",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/chat",
    }
)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
_LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class Metrics:
    """The process's counters and histograms; `enabled=False` makes every record a no-op."""

    def __init__(self, node: str, *, enabled: bool = True) -> None:
        self.node = node
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["node", "model", "route"]
        self._requests = Counter(
            "mlcp_requests",
            "Requests to routes that run models, by model, route and status code",
            [*labels, "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "mlcp_request_duration_seconds",
            "Time from a request's arrival to its answer's end",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "mlcp_time_to_first_token_seconds",
            "Time from opening a stream to its first text",
            ["node", "model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self._prompt = Counter(
            "mlcp_prompt_tokens",
            "Prompt tokens processed",
            ["node", "model"],
            registry=self.registry,
        )
        self._generation = Counter(
            "mlcp_generation_tokens",
            "Tokens generated",
            ["node", "model"],
            registry=self.registry,
        )
        self._load = Histogram(
            "mlcp_load_duration_seconds",
            "Time from launching an instance to it answering health checks",
            ["node", "model"],
            buckets=_LOAD_BUCKETS,
            registry=self.registry,
        )
        # Label lookups cost ~2 us each; children are cached per label tuple.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def request(self, model: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request and its duration."""
        if not self.enabled:
            return
        key = (model, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self._requests.labels(self.node, model, route, str(status)),
                self._duration.labels(self.node, model, route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def tokens(self, model: str, prompt: object, generated: object) -> None:
        """Add an answer's token counts (ignored unless integers, as agents send them)."""
        if not self.enabled:
            return
        if isinstance(prompt, int) and prompt > 0:
            self._prompt.labels(self.node, model).inc(prompt)
        if isinstance(generated, int) and generated > 0:
            self._generation.labels(self.node, model).inc(generated)

    def first_token(self, model: str, seconds: float) -> None:
        if self.enabled:
            self._ttft.labels(self.node, model).observe(seconds)

    def loaded(self, model: str, seconds: float) -> None:
        if self.enabled:
            self._load.labels(self.node, model).observe(seconds)

    def render(self, snapshot: Iterable[Metric]) -> bytes:
        """The text exposition of the recorded series plus a scrape-time snapshot."""
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(_Snapshot(list(snapshot)))
        return generate_latest(self.registry) + generate_latest(scrape)


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    """A scrape-time gauge family; the caller adds samples with `add_metric`."""
    return GaugeMetricFamily(name, documentation, labels=labels)


# The key under which a route handler names the model of its request, for the request's labels.
MODEL_SCOPE_KEY = "mlcp.model"


class RecordRequests:
    """ASGI middleware: counts and times requests to the routes that run models."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ROUTES:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            model = scope.get(MODEL_SCOPE_KEY) or "unknown"
            # No status sent: the client left first (nginx's 499).
            seconds = time.perf_counter() - started
            self.metrics.request(str(model), scope["path"], status or 499, seconds)
