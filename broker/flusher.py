"""Writes the events routed to idle streams through their sinks, once per event-loop turn.

Waking a stream's task to write one event costs a task switch and a trip through the ASGI
send chain (Starlette's middleware wrappers, uvicorn's send): with rows arriving one at a time
to 1,000 subscribers that was about half of the broker's CPU (docs/benchmarks.md). The hub
instead hands an idle stream's subscriber to `Flusher.mark`, and one callback, scheduled once
per event-loop turn, writes each marked subscriber's queue to its `Sink` in one write
(`subscriber.write_to_sinks`, beside the queue it empties). Everything a burst routed in that
turn goes out in that one write, so batching is kept; an event written to many sinks in a turn
is framed once (`server/sink.py`) and its latency observed once, with its count.

A subscriber has a sink only while its stream's task waits with nothing queued; a sink that
refuses (its socket still holds earlier bytes, or is closing) gets nothing, and the task is
woken instead, whose ASGI send applies flow control. Order holds: the task and the flusher
never both hold events.
"""

from __future__ import annotations

import asyncio

from .latency import LatencyHistogram
from .subscriber import Subscriber, write_to_sinks

__all__ = ["Flusher"]


class Flusher:
    """The once-per-turn writer of idle streams' queues (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, latency: LatencyHistogram) -> None:
        self._loop = loop
        self._latency = latency
        self._marked: list[Subscriber] = []

    def mark(self, subscriber: Subscriber) -> None:
        """`subscriber`, idle with a sink, has just been queued its first event."""
        if not self._marked:
            self._loop.call_soon(self._flush)
        self._marked.append(subscriber)

    def _flush(self) -> None:
        marked, self._marked = self._marked, []
        write_to_sinks(marked, self._latency.observe)
