"""Capped exponential backoff with half jitter, for reconnecting to PostgreSQL (and Redis)."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays that double from `initial` up to `maximum`; each is drawn from [delay/2, delay].

    Half-jitter keeps a floor under the delay (so a tight loop is impossible) while spreading
    the reconnects of many broker processes after a PostgreSQL restart.
    """

    def __init__(self, initial: float = 0.05, maximum: float = 5.0, factor: float = 2.0) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {initial} and {maximum}")
        if factor < 1:
            raise ValueError(f"factor must be at least 1, got {factor}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._delay = initial

    def next(self) -> float:
        """The next delay in seconds."""
        delay = self._delay
        self._delay = min(self._delay * self.factor, self.maximum)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._delay = self.initial
