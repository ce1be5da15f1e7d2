"""A delivery latency histogram cheap enough for the fan-out hot path.

Fixed bucket bounds and plain counts, no locks and no library: everything that records runs on
the event loop thread, and `/metrics` reads the counts there too, at scrape time. Recording one
value is a bisection over a dozen bounds and two additions.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable

__all__ = ["LATENCY_BOUNDS", "LatencyHistogram"]

# Seconds. Delivery on one machine takes well under a millisecond; the upper buckets show a
# loop that is overloaded or a stream whose socket pushes back.
LATENCY_BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class LatencyHistogram:
    """Counts of observations per bucket: `counts[i]` holds values in (bounds[i-1], bounds[i]],
    and the last count those above every bound (Prometheus' `+Inf`)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        if not self.bounds or list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"bounds must be increasing and not empty, got {self.bounds}")
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, seconds: float, times: int = 1) -> None:
        """Record `seconds`, `times` times over (the deliveries of one event in one write)."""
        self.counts[bisect_left(self.bounds, seconds)] += times
        self.sum += seconds * times

    def observe_since(self, starts: Iterable[float]) -> None:
        """Observe the time from each `time.perf_counter()` value of `starts` until now."""
        now = time.perf_counter()
        for start in starts:
            self.observe(now - start)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) per bucket, ending with `inf`."""
        buckets = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets
