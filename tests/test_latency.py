"""The delivery latency histogram: pure, so every edge is checked here."""

from __future__ import annotations

import time

import pytest

from broker.latency import LATENCY_BOUNDS, LatencyHistogram


def test_values_land_in_the_bucket_whose_bound_is_at_or_above_them() -> None:
    histogram = LatencyHistogram((0.001, 0.01, 0.1))
    for value in (0.0, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.2, 7.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 2, 2]
    assert histogram.count == 8
    assert histogram.sum == pytest.approx(7.3621)
    assert histogram.cumulative() == [(0.001, 2), (0.01, 4), (0.1, 6), (float("inf"), 8)]


def test_a_value_observed_several_times_counts_each() -> None:
    histogram = LatencyHistogram((0.001, 0.01))
    histogram.observe(0.005, times=1000)
    histogram.observe(0.0005)
    assert histogram.counts == [1, 1000, 0] and histogram.count == 1001
    assert histogram.sum == pytest.approx(5.0005)


def test_observe_since_measures_from_perf_counter_values() -> None:
    histogram = LatencyHistogram()
    now = time.perf_counter()
    histogram.observe_since([now - 0.3, now - 0.3, now])
    assert histogram.count == 3
    assert 0.6 <= histogram.sum < 0.7
    cumulative = dict(histogram.cumulative())
    assert cumulative[0.25] == 1 and cumulative[0.5] == 3


def test_default_bounds_cover_sub_millisecond_to_seconds() -> None:
    assert LATENCY_BOUNDS[0] <= 0.0001 and LATENCY_BOUNDS[-1] >= 5.0
    assert LatencyHistogram().cumulative()[-1] == (float("inf"), 0)


@pytest.mark.parametrize("bounds", [(), (0.1, 0.01), (0.1, 0.1)])
def test_bounds_must_increase(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing"):
        LatencyHistogram(bounds)
