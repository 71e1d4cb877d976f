"""Prometheus text exposition, without a client library: counters, gauges and histograms."""
from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        lines += [f"{self.name}_sum {self.total}", f"{self.name}_count {self.n}"]
        return lines


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}   # (endpoint, status) -> count
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.restarts = 0
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Time from request to first token.")
        self.per_token = Histogram("herd_time_per_output_token_seconds",
                                   "Time between output tokens of one request.")

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def render(self, queue_depth: int, ready: bool, batches: int = 0, batched_rows: int = 0) -> str:
        with self._lock:
            lines = ["# HELP herd_requests_total Requests by endpoint and HTTP status.",
                     "# TYPE herd_requests_total counter"]
            lines += [f'herd_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            errors = sum(n for (_, s), n in self.requests.items() if int(s) >= 400)
            lines += ["# HELP herd_request_errors_total Requests answered with an error status.",
                      "# TYPE herd_request_errors_total counter", f"herd_request_errors_total {errors}",
                      "# HELP herd_queue_depth Requests waiting or running in the engine.",
                      "# TYPE herd_queue_depth gauge", f"herd_queue_depth {queue_depth}",
                      "# HELP herd_generated_tokens_total Output tokens generated.",
                      "# TYPE herd_generated_tokens_total counter",
                      f"herd_generated_tokens_total {self.tokens_generated}",
                      "# HELP herd_prompt_tokens_total Prompt tokens processed.",
                      "# TYPE herd_prompt_tokens_total counter", f"herd_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP herd_ready 1 when every rank is loaded and the canary answers.",
                      "# TYPE herd_ready gauge", f"herd_ready {int(ready)}",
                      "# HELP herd_restarts_total Worker group restarts.",
                      "# TYPE herd_restarts_total counter", f"herd_restarts_total {self.restarts}",
                      "# HELP herd_batches_total Batches the engine ran.",
                      "# TYPE herd_batches_total counter", f"herd_batches_total {batches}",
                      "# HELP herd_batched_requests_total Requests in those batches (includes canaries).",
                      "# TYPE herd_batched_requests_total counter",
                      f"herd_batched_requests_total {batched_rows}"]
            lines += self.ttft.render() + self.per_token.render()
        return "\n".join(lines) + "\n"
