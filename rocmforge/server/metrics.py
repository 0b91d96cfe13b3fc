"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand: a few counters,
gauges and two histograms do not need a client library.

Counters and histograms are updated from the event loop and the scheduler thread, so every update takes a lock.
Gauges (queue depth, active sequences, free KV blocks) are read live when ``/metrics`` is scraped.

>>> m = Metrics()
>>> m.count_request("/v1/completions", 200)
>>> m.observe_ttft(0.3)
>>> text = m.render({"rocmforge_queue_depth": (0, "Requests waiting for a batch slot.")})
>>> 'rocmforge_requests_total{route="/v1/completions",status="200"} 1' in text
True
>>> 'rocmforge_time_to_first_token_seconds_bucket{le="0.5"} 1' in text
True
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Mapping, Sequence

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Histogram:
    """Cumulative-bucket histogram (Prometheus ``le`` semantics: a bucket counts values <= its bound)."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip([*map(_number, self.bounds), "+Inf"], self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return [*out, f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]


class Metrics:
    """Everything ``/metrics`` reports except the live gauges, which the caller passes to ``render``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.engine_errors = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_batch(self, n_sequences: int) -> None:
        with self._lock:
            self.batch_size.observe(n_sequences)

    def count_engine_error(self) -> None:
        with self._lock:
            self.engine_errors += 1

    def render(self, gauges: Mapping[str, tuple[float, str]]) -> str:
        """The exposition text; ``gauges`` maps a metric name to (value, help text)."""
        with self._lock:
            lines = _header("rocmforge_requests_total", "counter", "HTTP requests answered, by route and status.")
            lines += [f'rocmforge_requests_total{{route="{route}",status="{status}"}} {n}'
                      for (route, status), n in sorted(self.requests.items())]
            for name, value, help_text in [
                ("rocmforge_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished requests."),
                ("rocmforge_completion_tokens_total", self.completion_tokens, "Tokens generated."),
                ("rocmforge_engine_errors_total", self.engine_errors, "Forward passes that raised."),
            ]:
                lines += _header(name, "counter", help_text) + [f"{name} {value}"]
            lines += _header("rocmforge_time_to_first_token_seconds", "histogram",
                             "From request arrival to its first generated token.")
            lines += self.ttft.lines("rocmforge_time_to_first_token_seconds")
            lines += _header("rocmforge_batch_size", "histogram", "Sequences in each batched forward pass.")
            lines += self.batch_size.lines("rocmforge_batch_size")
        for name, (value, help_text) in gauges.items():
            lines += _header(name, "gauge", help_text) + [f"{name} {_number(value)}"]
        return "\n".join(lines) + "\n"


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
