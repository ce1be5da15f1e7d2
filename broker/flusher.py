"""Writes the events routed to idle streams through their sinks, once per event-loop turn.

Waking a stream's task to write one event costs a task switch and a trip through the ASGI
send chain (Starlette's middleware wrappers, uvicorn's send): with rows arriving one at a
time to 1,000 subscribers that was about half of the broker's CPU (`make bench`, fanout at
50 rows/s, py-spy). The hub instead hands an idle stream's subscriber to `Flusher.mark`, and
one callback, scheduled once per event-loop turn, writes each marked subscriber's queue to
its `Sink` in one write. Everything a burst routed in that turn goes out in that one write,
so batching is kept.

A subscriber has a sink only while its stream's task waits with nothing queued; a sink that
refuses (its socket still holds earlier bytes, or is closing) gets nothing, and the task is
woken instead, whose ASGI send applies flow control. Order holds: the task and the flusher
never both hold events.
"""

from __future__ import annotations

import asyncio
import time

from .latency import LatencyHistogram
from .subscriber import Subscriber

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
        now = time.perf_counter()
        observe = self._latency.observe
        for subscriber in marked:
            sink = subscriber.sink
            if sink is None or subscriber.closed or not subscriber.queued:
                continue  # its task took over meanwhile
            events = subscriber.take()
            body = events[0].data if len(events) == 1 else b"".join(e.data for e in events)
            if not sink.write(body):
                subscriber.put_back(events)
                subscriber.wake()
                continue
            subscriber.direct_sent += len(events)
            for event in events:
                if event.born:
                    observe(now - event.born)
