"""Serving metrics: counters, gauges and latency histograms, and their Prometheus text exposition.

Small on purpose (no client library): a Histogram keeps cumulative bucket counts, a sum and a count, which
is what the Prometheus text format wants and what p50/p99 estimates come from. A TokenRate gives tokens/s
over a sliding window of seconds. All of them are touched by the engine thread and read by the server
thread: reads and writes hold the owner's lock (Engine.metrics_lock).
"""

from __future__ import annotations

import bisect
import collections
import math
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["LATENCY_BUCKETS", "STEP_BUCKETS", "Histogram", "TokenRate", "prometheus_text"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Observations counted into fixed upper bounds (seconds), with their sum."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float:
        """An estimate of the q-quantile: linear inside the bucket it falls in (NaN when empty)."""
        if not self.count:
            return math.nan
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            if seen + c >= rank and c:
                lo = self.bounds[i - 1] if i > 0 else 0.0
                hi = self.bounds[i] if i < len(self.bounds) else lo
                return lo + (hi - lo) * (rank - seen) / c
            seen += c
        return self.bounds[-1]

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cum = 0
        for b, c in zip(self.bounds, self.counts, strict=False):
            cum += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {cum}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class TokenRate:
    """Tokens per second over the last `window` seconds."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self.events: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.events.append((now, n))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.events and self.events[0][0] < now - self.window:
            self.events.popleft()

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._trim(now)
        if not self.events:
            return 0.0
        span = max(now - self.events[0][0], 1e-3)
        return sum(n for _, n in self.events) / max(span, min(self.window, 1.0))


def prometheus_text(metrics: dict[str, Any], prefix: str = "rawformer") -> str:
    """The Prometheus text exposition of Engine.metrics(): gauges / counters for numbers (a name ending in
    _total is a counter), histograms for Histogram values."""
    lines: list[str] = []
    for key, value in metrics.items():
        name = f"{prefix}_{key}"
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Histogram):
            lines += value[0].lines(name, value[1])
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (int, float)):
            kind = "counter" if key.endswith("_total") else "gauge"
            lines += [f"# HELP {name} {value[1]}", f"# TYPE {name} {kind}", f"{name} {float(value[0]):g}"]
    return "\n".join(lines) + "\n"
