"""Writes the events routed to idle streams through their sinks, once per event-loop turn.

Waking a stream's task to write one event costs a task switch and a trip through the ASGI
send chain (Starlette's middleware wrappers, uvicorn's send): with rows arriving one at a
time to 1,000 subscribers that was about half of the broker's CPU (`make bench`, fanout at
50 rows/s, py-spy). The hub instead hands an idle stream's subscriber to `Flusher.mark`, and
one callback, scheduled once per event-loop turn, writes each marked subscriber's queue to
its `Sink` in one write. Everything a burst routed in that turn goes out in that one write,
so batching is kept; an event written to many sinks in a turn is framed once
(`socketsink.py`) and its latency observed once, with its count.

A subscriber has a sink only while its stream's task waits with nothing queued; a sink that
refuses (its socket still holds earlier bytes, or is closing) gets nothing, and the task is
woken instead, whose ASGI send applies flow control. Order holds: the task and the flusher
never both hold events.
"""

from __future__ import annotations

import asyncio
import time

from .latency import LatencyHistogram
from .subscriber import Event, Subscriber

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
        # Every subscriber of a fan-out was routed the same event: its latency is observed
        # once, with the number of deliveries, rather than once per delivery.
        last: Event | None = None
        times = 0
        observe = self._latency.observe
        for subscriber in marked:
            sink = subscriber.sink
            pending = subscriber._pending  # the hub's inlined path reads it the same way
            if sink is None or subscriber.closed or not pending:
                continue  # its task took over meanwhile
            body = pending[0].data if len(pending) == 1 else b"".join([e.data for e in pending])
            if not sink.write(body):
                subscriber.wake()  # its task writes them, with flow control
                continue
            subscriber.direct_sent += len(pending)
            for event in pending:
                if event is last:
                    times += 1
                elif event.born:
                    if last is not None:
                        observe(now - last.born, times)
                    last, times = event, 1
            pending.clear()
            subscriber._limit = subscriber._size  # as `Subscriber.take` does
        if last is not None:
            observe(now - last.born, times)
