"""Prometheus metrics under vLLM's names with a `headwise:` prefix, in a per-app registry
(several apps in one process, as in tests, must not share the global one)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from headwise.engine.outputs import RequestOutput

# vLLM's buckets, so dashboards built for vllm:* work after a prefix rename
_TTFT_BUCKETS = (
    0.001,
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
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
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
)
_REQUEST_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
PREFIX = "headwise:"

# the *_created series double the output and no dashboard reads them (vLLM drops them too)
disable_created_metrics()
LABELS = ["model_name"]


class ServerMetrics:
    """Request-level histograms and counters fed by the server; engine gauges read at scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = ""
        self._stats: Callable[[], object] | None = None

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=self.registry)

        def counter(name: str, doc: str, labels: list[str] = LABELS) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between generated tokens.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to last token.", _REQUEST_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time a request waited before its first schedule.", _REQUEST_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens", "Prefilled prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.success = counter("request_success", "Finished requests by finish reason.", LABELS + ["finished_reason"])
        self.rejected = counter("request_rejected", "Requests refused with HTTP 429 (queue full).")
        self.registry.register(_EngineCollector(self))

    def bind(self, model_name: str, stats: Callable[[], object]) -> None:
        """Called once the engine is loaded: the label value and the engine's stats()."""
        self.model_name = model_name
        self._stats = stats

    def engine_stats(self) -> object | None:
        return self._stats() if self._stats is not None else None

    def track(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Timing of one engine request, observed from the outputs the server receives."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics
        self._start = time.monotonic()
        self._last: float | None = None
        self._tokens = 0
        self._done = False

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        name = self._m.model_name
        new = len(out.token_ids) - self._tokens
        if new > 0:
            if self._last is None:
                self._m.ttft.labels(name).observe(now - self._start)
                self._m.prompt_tokens.labels(name).inc(len(out.prompt_token_ids))
            else:
                # tokens that arrive together share the interval evenly
                for _ in range(new):
                    self._m.itl.labels(name).observe((now - self._last) / new)
            self._m.generation_tokens.labels(name).inc(new)
            self._tokens = len(out.token_ids)
            self._last = now
        if out.finished and not self._done:
            self._done = True
            self._m.e2e.labels(name).observe(now - self._start)
            self._m.success.labels(name, out.finish_reason or "unknown").inc()
            if out.first_scheduled_time is not None and out.arrival_time:
                self._m.queue_time.labels(name).observe(max(0.0, out.first_scheduled_time - out.arrival_time))


class _EngineCollector:
    """Engine gauges and cumulative counters, read from engine.stats() at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._m.engine_stats()
        if stats is None:
            return
        label = [self._m.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            family.add_metric(label, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
            family.add_metric(label, value)
            return family

        yield gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting for admission.", stats.num_waiting)
        yield gauge(
            "kv_cache_usage_perc",
            "Fraction of KV blocks held by requests (0..1); cached blocks no "
            "request holds count as free. Under tensor parallelism: the tightest rank.",
            stats.kv_cache_usage,
        )
        yield gauge(
            "kv_cache_num_blocks", "KV blocks in the pool (of one rank under tensor parallelism).", stats.num_blocks
        )
        yield gauge(
            "kv_cache_free_blocks",
            "KV blocks a new request may take: free or cached (on the tightest rank).",
            stats.num_free_blocks,
        )
        yield gauge(
            "kv_cache_cached_blocks",
            "KV blocks no request holds, kept for prefix-cache hits (evictable, counted as free).",
            stats.num_cached_blocks,
        )
        yield counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_queries
        )
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", stats.prefix_cache_hits)
        yield counter("num_preemptions", "Preemptions (recompute) so far.", stats.num_preemptions)
        yield counter("kv_bytes_saved", "KV bytes not allocated thanks to head-aware plans.", stats.kv_bytes_saved)
