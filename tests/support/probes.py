"""Timing a moment from outside: a thread that polls a condition until it first holds."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

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


async def postgres_outage(
    database: Any, session_id: str, down: Callable[[], bool], *probes: FirstSuccess
) -> tuple[FirstSuccess, list[int]]:
    """Stop `database`'s server until `down()` holds, 3 s more (long enough for any backoff
    to grow), then start it with `probes` running. Returns the probe that inserted the first
    row for `session_id` once it accepts connections (its `at`), and that row's id."""
    await asyncio.to_thread(database.server.stop, "fast")
    deadline = time.monotonic() + 10
    while not await asyncio.to_thread(down):
        assert time.monotonic() < deadline, "still up 10 s after PostgreSQL stopped"
        await asyncio.sleep(0.02)
    await asyncio.sleep(3)  # the outage itself
    inserted: list[int] = []

    def accepts_and_inserts() -> bool:
        inserted.append(database.insert(session_id, "first row after the return"))
        return True

    accepting = FirstSuccess(accepts_and_inserts)
    for probe in (accepting, *probes):
        probe.start()
    await asyncio.to_thread(database.server.start)
    await asyncio.to_thread(accepting.join, 30)
    return accepting, inserted
