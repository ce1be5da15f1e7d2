"""broker.feeds.backoff: delays double up to the cap, each drawn with half jitter, and reset."""

from __future__ import annotations

import random

import pytest

from broker.feeds.backoff import Backoff


def test_delays_double_up_to_the_maximum_each_drawn_from_its_upper_half() -> None:
    random.seed(11)
    backoff = Backoff(initial=0.1, maximum=1.0)
    nominal = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    delays = [backoff.next() for _ in nominal]
    for delay, ceiling in zip(delays, nominal, strict=True):
        assert ceiling / 2 <= delay <= ceiling


def test_the_jitter_is_half_not_full_and_spreads_the_delays() -> None:
    """Half jitter: a floor of half the delay (never a tight loop), and spread above it."""
    random.seed(12)
    draws = [Backoff(initial=1.0, maximum=1.0).next() for _ in range(2_000)]
    assert min(draws) >= 0.5 and max(draws) <= 1.0
    assert min(draws) < 0.52 and max(draws) > 0.98  # the whole upper half is used
    assert 0.72 < sum(draws) / len(draws) < 0.78  # uniform: a mean of 0.75


def test_reset_starts_again_from_the_initial_delay() -> None:
    backoff = Backoff(initial=0.01, maximum=10.0)
    for _ in range(10):
        backoff.next()
    assert backoff.next() > 0.01
    backoff.reset()
    assert backoff.next() <= 0.01


def test_a_factor_of_one_keeps_the_delay() -> None:
    backoff = Backoff(initial=0.2, maximum=5.0, factor=1.0)
    assert all(0.1 <= backoff.next() <= 0.2 for _ in range(20))


@pytest.mark.parametrize(
    ("initial", "maximum", "factor", "fragment"),
    [
        (0.0, 1.0, 2.0, "0 < initial <= maximum"),
        (-1.0, 1.0, 2.0, "0 < initial <= maximum"),
        (2.0, 1.0, 2.0, "0 < initial <= maximum"),
        (0.1, 1.0, 0.5, "factor must be at least 1"),
    ],
)
def test_invalid_arguments_are_refused(
    initial: float, maximum: float, factor: float, fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        Backoff(initial, maximum, factor)
