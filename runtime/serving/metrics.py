"""herd's Prometheus metrics, through prometheus_client (escaping and exposition done right).

Requests are labelled by route template ("/v1/chat/completions", "/v1/{path:path}"), never by the raw
path: a client probing random URLs (even without a key) must not create new series, and a `"` in a
path must not break the scrape. Paths that match no route share the label "other".
Each server gets its own registry, so several apps in one process (tests) do not collide.

One scrape target per node: with an external engine (vLLM), herd's /metrics also carries the engine's
own families (`vllm:` KV-cache usage, queue, preemptions, ...), fetched from the engine on each scrape
and re-rendered after herd's (see `relayed_families`). GPU gauges come from NVML where there are GPUs
(runtime/serving/gpu_telemetry.py) and are absent elsewhere.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UNMATCHED_ROUTE = "other"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# The phases of runtime.serving.supervisor.Health (and the external engine's), one series each, so that a
# dashboard shows what a replica is doing and a phase that never occurred still has a 0.
PHASES = ("starting", "loading", "ready", "not_ready", "restarting", "failed", "stopping")
# Families of prometheus_client's default collectors: in an engine's exposition they describe the
# engine's API process, not herd, and herd may add its own under the same names.
ENGINE_DROPPED_PREFIXES = ("process_", "python_", "platform_")


@dataclass
class EngineScrape:
    """One fetch of an external engine's /metrics: its text, or why there is none."""
    text: str | None
    seconds: float
    error: str | None = None


class Metrics:
    def __init__(self, gpu: bool = True):
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
        self._phase = Gauge("herd_phase", "1 for the phase the serving group is in, 0 for the others.",
                            ["phase"], registry=r)
        self._loaded = Gauge("herd_ranks_loaded", "Ranks (or engines) of this serving group that are loaded.",
                             registry=r)
        self._world = Gauge("herd_world_size", "Ranks (or engines) this serving group has in all.", registry=r)
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
        # Only registered once an external engine is scraped: herd's own engine has no such thing.
        self._engine_up: Gauge | None = None
        self._engine_seconds: Gauge | None = None
        # Registered by enable_guard, when the front screens with a guard model.
        self._guard_seconds: Histogram | None = None
        self._guard_verdicts: Counter | None = None
        self._guard_categories: Counter | None = None
        self._restart_count = 0
        self._render_lock = threading.Lock()   # /metrics renders in worker threads
        if gpu:
            from runtime.serving.gpu_telemetry import process_collector
            r.register(process_collector())

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

    def enable_guard(self, screens: tuple[str, ...], categories: tuple[str, ...]) -> None:
        """The guard's families, with a 0 for every screen, outcome and category from the start (a
        dashboard's rate() of a verdict that never occurred is then 0, not absent)."""
        r = self.registry
        self._guard_seconds = Histogram("herd_guard_seconds", "Time one guard screening took (its HTTP call, "
                                        "failures included), by what was screened.", ["screen"],
                                        buckets=LATENCY_BUCKETS, registry=r)
        self._guard_verdicts = Counter("herd_guard_verdicts", "Guard screenings by what was screened and "
                                       "outcome: safe, unsafe, or error (down, timed out, unparsable; "
                                       "refused or passed as serving.guard.on_error says).",
                                       ["screen", "outcome"], registry=r)
        self._guard_categories = Counter("herd_guard_flagged_categories", "Categories named by unsafe "
                                         "verdicts (S1..S14; other for a code outside that list).",
                                         ["screen", "category"], registry=r)
        for screen in screens:
            self._guard_seconds.labels(screen=screen)
            for outcome in ("safe", "unsafe", "error"):
                self._guard_verdicts.labels(screen=screen, outcome=outcome)
            for category in categories:
                self._guard_categories.labels(screen=screen, category=category)

    def guard_screened(self, screen: str, seconds: float, outcome: str, categories: tuple[str, ...] = ()) -> None:
        if self._guard_seconds is None or self._guard_verdicts is None or self._guard_categories is None:
            return   # a guard used without enable_guard: nothing to count into
        self._guard_seconds.labels(screen=screen).observe(seconds)
        self._guard_verdicts.labels(screen=screen, outcome=outcome).inc()
        for category in categories:
            self._guard_categories.labels(screen=screen, category=category).inc()

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
    def render(self, queue_depth: int, ready: bool, batches: int = 0, batched_rows: int = 0, *,
               phase: str | None = None, loaded: int | None = None, world: int | None = None,
               engine: EngineScrape | None = None) -> str:
        with self._render_lock:
            return self._render(queue_depth, ready, batches, batched_rows, phase, loaded, world, engine)

    def _render(self, queue_depth, ready, batches, batched_rows, phase, loaded, world, engine) -> str:
        self._queue.set(queue_depth)
        self._ready.set(int(ready))
        self._batches.set(batches)
        self._batched.set(batched_rows)
        if phase is not None:
            for name in {*PHASES, phase}:
                self._phase.labels(phase=name).set(int(name == phase))
        if loaded is not None:
            self._loaded.set(loaded)
        if world is not None:
            self._world.set(world)
        relayed = ""
        if engine is not None:
            families, error = [], engine.error
            if engine.text is not None:
                try:
                    families = relayed_families(engine.text)
                except Exception as err:  # noqa: BLE001 - a garbled exposition must not break herd's
                    error = f"unparseable exposition ({type(err).__name__}: {str(err)[:80]})"
            self._engine_gauges(error is None, engine.seconds)
            if error is None and families:
                relayed = _render_families(families)
        return generate_latest(self.registry).decode() + relayed

    def _engine_gauges(self, up: bool, seconds: float) -> None:
        if self._engine_up is None or self._engine_seconds is None:
            self._engine_up = Gauge("herd_engine_metrics_up", "1 when the engine's own /metrics answered "
                                    "(and parsed) during this scrape; its families follow herd's.",
                                    registry=self.registry)
            self._engine_seconds = Gauge("herd_engine_metrics_fetch_seconds",
                                         "How long fetching the engine's /metrics took.", registry=self.registry)
        self._engine_up.set(int(up))
        self._engine_seconds.set(seconds)


def relayed_families(text: str) -> list:
    """The engine's families worth relaying: all but the default collectors' (process_, python_,
    platform_) and any in herd's own namespace (one exposition must not name a family twice, and
    every herd family is herd_*: herd's own wins). Raises ValueError on a garbled exposition."""
    from prometheus_client.parser import text_string_to_metric_families
    return [family for family in text_string_to_metric_families(text)
            if not family.name.startswith((*ENGINE_DROPPED_PREFIXES, "herd_"))
            and not any(s.name.startswith("herd_") for s in family.samples)]


def _render_families(families: list) -> str:
    class _Fixed:
        def collect(self):
            return families
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry).decode()


# ------------------------------------------------------------------ requests an external engine answers
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class RelayedGeneration:
    """herd's request histograms for a generation answered by an external engine.

    Streaming: every server-sent event that carries generated text (a completion's `text`, a chat
    delta's content, reasoning or tool call) counts as one token when it passes through the front:
    the first one gives the time to first token, each later one a time per output token (vLLM sends
    one token per event by default; an engine that batches several tokens per event shows longer
    gaps and fewer of them). A final `usage` (stream_options.include_usage) replaces the counted
    tokens with the engine's own figures. Non-streaming: the body's `usage` gives the tokens; the
    time to first token is not observable from outside and is not recorded.
    """

    def __init__(self, metrics: Metrics, started: float):
        self.metrics = metrics
        self.started = started
        self.tokens = 0
        self.usage: dict | None = None
        self._last: float | None = None
        self._buffer = b""
        self._closed = False

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        now = time.monotonic()
        for line in lines:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                event = json.loads(payload)
            except ValueError:
                continue
            if isinstance(event, dict):
                self._event(event, now)

    def _event(self, event: dict, now: float) -> None:
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if not any(_carries_text(c) for c in event.get("choices") or [] if isinstance(c, dict)):
            return
        if self._last is None:
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.per_token.observe(now - self._last)
        self._last = now
        self.tokens += 1

    def body(self, data: bytes) -> None:
        """A non-streaming answer: its usage."""
        try:
            answer = json.loads(data)
        except ValueError:
            return
        if isinstance(answer, dict) and isinstance(answer.get("usage"), dict):
            self.usage = answer["usage"]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.metrics.e2e.observe(time.monotonic() - self.started)
        usage = self.usage or {}
        completion = usage.get("completion_tokens")
        tokens = completion if isinstance(completion, int) and completion >= 0 else self.tokens
        if tokens:
            self.metrics.generated(tokens)
        prompt = usage.get("prompt_tokens")
        if isinstance(prompt, int) and prompt > 0:
            self.metrics.prompt(prompt)


def _carries_text(choice: dict) -> bool:
    delta = choice.get("delta")
    if isinstance(delta, dict):   # chat: the first event only names the role
        return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
                    or delta.get("tool_calls"))
    return bool(choice.get("text"))
