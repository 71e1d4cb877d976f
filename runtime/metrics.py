"""herd's Prometheus metrics, through prometheus_client (escaping and exposition done right).

Requests are labelled by route template ("/v1/chat/completions", "/v1/{path:path}"), never by the raw
path: a client probing random URLs (even without a key) must not create new series, and a `"` in a
path must not break the scrape. Paths that match no route share the label "other".
Each server gets its own registry, so several apps in one process (tests) do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UNMATCHED_ROUTE = "other"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("herd_requests", "Requests by route template and HTTP status.",
                                 ["route", "status"], registry=r)
        self._errors = Counter("herd_request_errors", "Requests answered with an error status.", registry=r)
        self._generated = Counter("herd_generated_tokens", "Output tokens generated.", registry=r)
        self._prompt = Counter("herd_prompt_tokens", "Prompt tokens processed.", registry=r)
        self._restarts = Counter("herd_restarts", "Worker group restarts.", registry=r)
        self._queue = Gauge("herd_queue_depth", "Requests waiting or running in the engine.", registry=r)
        self._ready = Gauge("herd_ready", "1 when every rank is loaded and the canary answers.", registry=r)
        self._batches = Gauge("herd_batches_total", "Batches the engine ran (from the supervisor).",
                              registry=r)
        self._batched = Gauge("herd_batched_requests_total",
                              "Requests in those batches, canaries included (from the supervisor).", registry=r)
        self._loop_lag = Histogram("herd_event_loop_lag_seconds",
                                   "How late the server's event loop woke up for a periodic timer.",
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Time from request to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("herd_time_per_output_token_seconds",
                                   "Time between output tokens of one request.", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("herd_request_latency_seconds", "Time from request to its last byte (generation "
                             "endpoints).", buckets=LATENCY_BUCKETS, registry=r)
        self._restart_count = 0

    # ---------------------------------------------------------------- updates
    def request(self, route: str, status: int) -> None:
        self._requests.labels(route=route, status=str(status)).inc()
        if status >= 400:
            self._errors.inc()

    def generated(self, tokens: int = 1) -> None:
        self._generated.inc(tokens)

    def prompt(self, tokens: int) -> None:
        self._prompt.inc(tokens)

    def loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(max(0.0, seconds))

    @property
    def restarts(self) -> int:
        return self._restart_count

    @restarts.setter
    def restarts(self, value: int) -> None:
        # The supervisor's hook sets the running count; the counter only ever moves forward.
        if value > self._restart_count:
            self._restarts.inc(value - self._restart_count)
            self._restart_count = value

    # ---------------------------------------------------------------- exposition
    def render(self, queue_depth: int, ready: bool, batches: int = 0, batched_rows: int = 0) -> str:
        self._queue.set(queue_depth)
        self._ready.set(int(ready))
        self._batches.set(batches)
        self._batched.set(batched_rows)
        return generate_latest(self.registry).decode()
