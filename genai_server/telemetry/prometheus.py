"""Prometheus ``/metrics`` through the official client library: the per-request telemetry, aggregated.

Names follow vLLM's (``vllm:time_to_first_token_seconds`` -> ``genai_server_time_to_first_token_seconds``),
labelled by model and backend, so dashboards built for vLLM need only a new prefix. Each app has its own
registry: several apps in one process (the tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from genai_server.protocol import RequestMetrics
from genai_server.telemetry.genai import error_type, provider_name
from genai_server.telemetry.load import ReplicaLoad, Residency
from genai_server.telemetry.record import RequestRecord

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_LABELS = ("model", "backend")

# OpenTelemetry GenAI semantic conventions (gen-ai-metrics.md): the server histograms, with the spec's own bucket
# lists, so that PromQL aggregates them with vLLM's and Envoy AI Gateway's. Kept beside ours, whose finer buckets
# resolve CPU-speed tokens.
_SEMCONV_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_SEMCONV_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_SEMCONV_DURATION_BUCKETS = (
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
    20.48,
    40.96,
    81.92,
)
# The attributes, as Prometheus labels (dots become underscores, as the OTel Prometheus exporter writes them).
_SEMCONV_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type")


@dataclass(frozen=True)
class Slo:
    """Service-level objectives a request must all meet to count as goodput (vLLM's --goodput); None = not set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def configured(self) -> bool:
        """Whether any objective is set (without one, goodput is not reported)."""
        return any(value is not None for value in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met(self, figures: RequestMetrics) -> bool:
        """Whether every objective that is set was met. A request without a first token misses a TTFT objective;
        one with a single token has no TPOT and cannot miss that one."""
        ttft, tpot, e2e = figures.time_to_first_token_ms, figures.time_per_output_token_ms, figures.e2e_latency_ms
        return (
            _within(ttft, self.ttft_ms, missing_meets=False)
            and _within(tpot, self.tpot_ms, missing_meets=True)
            and _within(e2e, self.e2e_ms, missing_meets=False)
        )


def _within(value: float | None, limit: float | None, *, missing_meets: bool) -> bool:
    if limit is None:
        return True
    return missing_meets if value is None else value <= limit


@dataclass(frozen=True)
class Gauges:
    """What the gauges read at scrape time."""

    running: int  # generation requests in flight
    waiting: int  # requests queued for a slot + sequences the backends have accepted and not yet started
    kv_cache_usage: dict[str, float]  # per model whose backend holds a KV cache here: the share of its budget in use
    gpu_used_mb: float | None  # None without a GPU


class ReplicaCollector(Collector):
    """Per replica of each relayed model, read at scrape time: in flight from here, healthy, requests, errors, and
    the conversations it was sent or passed over for. The series are bounded by the models file (the replica label
    is a configured URL without credentials)."""

    # Each family and how it reads one replica.
    _FAMILIES: tuple[
        tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, Callable[[ReplicaLoad], float]], ...
    ] = (
        (GaugeMetricFamily, "in_flight", "Requests this gateway has in flight on the replica.", lambda r: r.in_flight),
        (GaugeMetricFamily, "healthy", "1 while the replica is admitted, 0 while ejected.", lambda r: int(r.healthy)),
        (CounterMetricFamily, "requests", "Requests sent to the replica (retries included).", lambda r: r.requests),
        (CounterMetricFamily, "errors", "Requests it failed before any token went out.", lambda r: r.errors),
        (
            CounterMetricFamily,
            "prefix_hits",
            "Requests sent to the replica because it served their conversation's earlier turns (cache_aware).",
            lambda r: r.prefix_hits,
        ),
        (
            CounterMetricFamily,
            "prefix_passed_over",
            "Requests whose earlier turns the replica served, sent elsewhere because it was overloaded.",
            lambda r: r.prefix_passed_over,
        ),
    )

    def __init__(self, replicas: Callable[[], dict[str, tuple[ReplicaLoad, ...]]]) -> None:
        self._replicas = replicas  # per relayed model, its upstream's replicas as its backend reports them

    def collect(self) -> Iterator[Metric]:
        replicas = self._replicas()
        for kind, name, doc, read in self._FAMILIES:
            family = kind(f"genai_server_upstream_replica_{name}", doc, labels=["model", "replica"])
            for model, members in replicas.items():
                for replica in members:
                    family.add_metric([model, replica.name], read(replica))
            yield family


class ResidencyCollector(Collector):
    """Per model loaded on demand (MODELS_DIR), read at scrape time: loaded or not, loads, unloads, last load time.
    The series are bounded by the models folder."""

    _FAMILIES: tuple[
        tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, Callable[[Residency], float | None]], ...
    ] = (
        (GaugeMetricFamily, "model_loaded", "1 while the model is in memory, 0 while it is not.", lambda r: r.loaded),
        (CounterMetricFamily, "model_loads", "Times the model was loaded.", lambda r: r.loads),
        (
            CounterMetricFamily,
            "model_unloads",
            "Times the model was unloaded (idle, evicted, asked).",
            lambda r: r.unloads,
        ),
        (GaugeMetricFamily, "model_load_seconds", "How long the model's last load took.", lambda r: r.load_seconds),
    )

    def __init__(self, residency: Callable[[], dict[str, Residency]]) -> None:
        self._residency = residency

    def collect(self) -> Iterator[Metric]:
        models = self._residency()
        for kind, name, doc, read in self._FAMILIES:
            family = kind(f"genai_server_{name}", doc, labels=["model"])
            for model, residency in models.items():
                value = read(residency)
                if value is not None:
                    family.add_metric([model], float(value))
            yield family


class ServerMetrics:
    """The Prometheus collectors of one server."""

    def __init__(
        self,
        gauges: Callable[[], Gauges],
        slo: Slo | None = None,
        replicas: Callable[[], dict[str, tuple[ReplicaLoad, ...]]] = dict,
        residency: Callable[[], dict[str, Residency]] = dict,
    ) -> None:
        self._gauges = gauges
        self._slo = slo or Slo()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._semconv_histograms()
        self.registry.register(ReplicaCollector(replicas))
        self.registry.register(ResidencyCollector(residency))
        self.replica_ttft = Histogram(
            "genai_server_upstream_replica_time_to_first_token_seconds",
            "Arrival to first token, by the upstream replica that served the request.",
            ("model", "replica"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.goodput = (
            Counter(
                "genai_server_goodput_requests",
                "Successful requests that met every configured SLO (SLO_TTFT_MS, SLO_TPOT_MS, SLO_E2E_MS).",
                _LABELS,
                registry=self.registry,
            )
            if self._slo.configured
            else None
        )

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"genai_server_{name}", doc, _LABELS, buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds", "(e2e - TTFT) / (tokens - 1).", _TOKEN_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between successive tokens.", _TOKEN_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to the start of generation.", _LATENCY_BUCKETS)
        self.prompt_tokens = Counter("genai_server_prompt_tokens", "Prompt tokens.", _LABELS, registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "genai_server_prompt_tokens_cached",
            "Prompt tokens served from the prefix cache instead of being prefilled.",
            _LABELS,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "genai_server_generation_tokens", "Generated tokens.", _LABELS, registry=self.registry
        )
        self.requests = Counter(
            "genai_server_requests", "Generation requests by HTTP status.", (*_LABELS, "status"), registry=self.registry
        )
        self.disconnects = Counter(
            "genai_server_client_disconnects", "Clients that left before the end.", _LABELS, registry=self.registry
        )
        self.running = Gauge(
            "genai_server_num_requests_running", "Generation requests in flight.", registry=self.registry
        )
        self.gpu_used: Gauge | None = None  # registered at the first scrape that finds a GPU: no GPU, no series
        self.waiting = Gauge(
            "genai_server_num_requests_waiting",
            "Requests queued for a slot, plus sequences waiting for a batch to start in the embedded engines.",
            registry=self.registry,
        )
        self.kv_cache = Gauge(
            "genai_server_kv_cache_usage_perc",
            "Share of an embedded engine's KV-cache memory budget held by running sequences (0-1).",
            ("model",),
            registry=self.registry,
        )

    def _semconv_histograms(self) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, _SEMCONV_LABELS, buckets=buckets, unit="seconds", registry=self.registry)

        self.semconv_ttft = histogram(
            "gen_ai_server_time_to_first_token", "gen_ai.server.time_to_first_token", _SEMCONV_TTFT_BUCKETS
        )
        self.semconv_tpot = histogram(
            "gen_ai_server_time_per_output_token", "gen_ai.server.time_per_output_token", _SEMCONV_TPOT_BUCKETS
        )
        self.semconv_duration = histogram(
            "gen_ai_server_request_duration", "gen_ai.server.request.duration", _SEMCONV_DURATION_BUCKETS
        )

    def observe(self, record: RequestRecord) -> None:
        """Record one finished generation request (its duration from its arrival, refused or not)."""
        labels = (record.model_label, record.backend)
        self.requests.labels(*labels, str(record.status)).inc()
        semconv = (record.operation or "", provider_name(record.backend), record.model_label, error_type(record.status))
        self.semconv_duration.labels(*semconv).observe(record.duration_s)
        figures = record.figures
        if figures is None:
            return
        self._observe_semconv(figures, semconv)
        if record.replica is not None and figures.time_to_first_token_ms is not None:
            self.replica_ttft.labels(record.model_label, record.replica).observe(figures.time_to_first_token_ms / 1000)
        if self.goodput is not None and record.status == 200:
            good = self.goodput.labels(*labels)  # present from the first answer, so a ratio never lacks its series
            if self._slo.met(figures):
                good.inc()
        for histogram, value in (
            (self.ttft, figures.time_to_first_token_ms),
            (self.e2e, figures.e2e_latency_ms),
            (self.queue, figures.queue_time_ms),
            (self.tpot, figures.time_per_output_token_ms),
        ):
            if value is not None:
                histogram.labels(*labels).observe(value / 1000)
        itl = self.itl.labels(*labels)
        for seconds in record.itl_s:
            itl.observe(seconds)
        self.prompt_tokens.labels(*labels).inc(figures.prompt_tokens)
        self.cached_prompt_tokens.labels(*labels).inc(figures.cached_prompt_tokens or 0)
        self.generation_tokens.labels(*labels).inc(figures.completion_tokens)
        if record.client_disconnected:  # mid-stream, or mid-wait for a JSON answer
            self.disconnects.labels(*labels).inc()

    def _observe_semconv(self, figures: RequestMetrics, labels: tuple[str, ...]) -> None:
        """TTFT and TPOT under the GenAI semconv attributes."""
        for histogram, value in (
            (self.semconv_ttft, figures.time_to_first_token_ms),
            (self.semconv_tpot, figures.time_per_output_token_ms),
        ):
            if value is not None:
                histogram.labels(*labels).observe(value / 1000)

    def gauges(self) -> Gauges:
        """The gauges now (what a scrape reads), for another reader (the playground's ``/load``)."""
        return self._gauges()

    def exposition(self) -> bytes:
        """The text format, with the gauges read now."""
        gauges = self._gauges()
        self.running.set(gauges.running)
        self.waiting.set(gauges.waiting)
        for model, usage in gauges.kv_cache_usage.items():
            self.kv_cache.labels(model).set(usage)
        gpu_used_mb = gauges.gpu_used_mb
        if gpu_used_mb is not None:
            if self.gpu_used is None:
                self.gpu_used = Gauge(
                    "genai_server_gpu_memory_used_bytes",
                    "Memory in use on the visible GPUs (NVML).",
                    registry=self.registry,
                )
            self.gpu_used.set(gpu_used_mb * 1024 * 1024)
        return generate_latest(self.registry)
