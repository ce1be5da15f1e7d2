"""Timing a moment from outside: a thread that polls a condition until it first holds."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psycopg


class FirstSuccess(threading.Thread):
    """Calls `probe` every `interval` s until it returns True; `at` is then when
    (`time.monotonic()`, 0.0 if it never did within `timeout`). OSError and psycopg errors
    count as False."""

    def __init__(
        self, probe: Callable[[], bool], interval: float = 0.01, timeout: float = 60.0
    ) -> None:
        super().__init__(daemon=True)
        self.probe, self.interval, self.timeout = probe, interval, timeout
        self.at = 0.0

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, psycopg.Error):
                if self.probe():
                    self.at = time.monotonic()
                    return
            time.sleep(self.interval)
