"""Subscribers and routing, with no I/O.

The hub holds every open stream's `Subscriber`, indexed by session, and routes each message to
the subscribers of its session and to the global ones, checking a subscriber's robot filter.
Each event is encoded once; all its subscribers queue the same bytes. A subscriber's queue is
bounded: when it is full the subscriber is closed (slow consumer) and its client resumes by
replay, so one slow reader never delays the others and memory stays bounded.

Everything here runs on the event loop thread and never awaits while routing, so a subscriber
added between two notifications sees exactly the later one, which the replay merge relies on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .errors import AtCapacity
from .events import Message, encode_heartbeat, encode_message
from .journal import Journal
from .latency import LatencyHistogram

__all__ = ["GLOBAL_CHANNEL", "Event", "Hub", "HubCounters", "Subscriber", "channel_of"]

GLOBAL_CHANNEL = "session_messages:global"
SLOW_CONSUMER = "slow consumer: reconnect to resume"
JOURNAL_SIZE = 50_000
_NOBODY: frozenset[Subscriber] = frozenset()


def channel_of(session_id: str | None) -> str:
    """The logical channel a stream is counted under in stats and logs."""
    return GLOBAL_CHANNEL if session_id is None else f"session_messages:{session_id}"


@dataclass(frozen=True, slots=True)
class Event:
    """Encoded bytes of one event, shared by its subscribers; `id` is the row id or 0.
    `born` is the `time.perf_counter()` of its routing (0 for heartbeats), for latency."""

    id: int
    data: bytes
    born: float = 0.0


class Subscriber:
    """One open stream's filter and bounded queue of encoded events."""

    __slots__ = (
        "_limit",
        "_loop",
        "_pending",
        "_waiter",
        "close_reason",
        "closed",
        "direct_sent",
        "on_close",
        "robot_id",
        "session_id",
        "transport",
    )

    def __init__(self, session_id: str | None, robot_id: str | None, queue_size: int) -> None:
        self.session_id = session_id
        self.robot_id = robot_id
        self.closed = False
        self.close_reason: str | None = None
        self.on_close: Callable[[], None] | None = None
        self._pending: deque[Event] = deque()
        self._limit = queue_size
        self._waiter: asyncio.Future[None] | None = None
        # Set by a live stream while it idles: its socket, for `stream.SocketFlusher`.
        self.transport: asyncio.WriteTransport | None = None
        self.direct_sent = 0
        # Kept, not looked up per wait: on CPython 3.11 get_running_loop() costs a getpid().
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def channel(self) -> str:
        return channel_of(self.session_id)

    def push(self, event: Event) -> bool:
        """Queue `event`; at a full queue close the subscriber instead. True if queued."""
        if self.closed:
            return False
        if len(self._pending) >= self._limit:
            self.close(SLOW_CONSUMER)
            return False
        self._pending.append(event)
        if len(self._pending) == 1:  # a waiting stream has an empty queue: wake it once
            self.wake()
        return True

    def take(self) -> list[Event]:
        """Every queued event, oldest first, leaving the queue empty."""
        events = list(self._pending)
        self._pending.clear()
        return events

    async def wait(self) -> None:
        """Return once an event is queued or the subscriber is closed."""
        if self._pending or self.closed:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self, reason: str | None = None) -> None:
        """Stop queueing; wake the stream so it can send `reason` (if any) and end.

        `on_close` runs here, possibly while the hub iterates its subscribers: it may cancel
        the stream's task but must not unsubscribe (the stream does that as it ends).
        """
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._pending.clear()
        self.wake()
        if self.on_close is not None:
            self.on_close()

    def wake(self) -> None:
        """Wake the stream's task if it waits (it then writes what is queued)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


@dataclass(slots=True)
class HubCounters:
    """Monotonic counters, read by stats and `/metrics` at scrape time."""

    messages_routed: int = 0
    events_delivered: int = 0
    slow_consumer_disconnects: int = 0
    rejected_connections: int = 0
    replayed_events: int = 0
    delivery_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(slots=True)
class Hub:
    """Every subscriber of this process, and the routing of messages to them."""

    max_subscribers: int
    queue_size: int
    journal: Journal = field(default_factory=lambda: Journal(JOURNAL_SIZE))
    # Called, instead of waking its task, for a subscriber in direct mode that just got its
    # first queued event.
    on_idle_ready: Callable[[Subscriber], None] | None = None
    counters: HubCounters = field(default_factory=HubCounters)
    _by_session: dict[str, set[Subscriber]] = field(default_factory=dict)
    _global: set[Subscriber] = field(default_factory=set)
    _count: int = 0

    def __len__(self) -> int:
        return self._count

    def subscribe(self, session_id: str | None, robot_id: str | None) -> Subscriber:
        """Register a subscriber. Raises `AtCapacity` at `max_subscribers`."""
        if self._count >= self.max_subscribers:
            self.counters.rejected_connections += 1
            raise AtCapacity("too many connections: retry later")
        subscriber = Subscriber(session_id, robot_id, self.queue_size)
        if session_id is None:
            self._global.add(subscriber)
        else:
            self._by_session.setdefault(session_id, set()).add(subscriber)
        self._count += 1
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Remove a subscriber; safe to call more than once."""
        if subscriber.session_id is None:
            group = self._global
        else:
            group = self._by_session.get(subscriber.session_id, set())
        if subscriber not in group:
            return
        group.discard(subscriber)
        if not group and subscriber.session_id is not None:
            del self._by_session[subscriber.session_id]
        self._count -= 1

    def publish(self, message: Message) -> int:
        """Route one message to every matching subscriber; returns how many queued it.

        The hot path: `Subscriber.push` is inlined here (measured 3x faster per subscriber
        than the method call and a generator over the candidate sets). A subscriber whose
        stream idles in direct mode (`Subscriber.transport` set) is handed to
        `on_idle_ready` instead of having its stream task woken (see `stream.SocketFlusher`).
        """
        self.journal.append(message.id, message.session_id, message.robot_id)
        event = Event(message.id, encode_message(message), time.perf_counter())
        on_idle_ready = self.on_idle_ready
        robot_id = message.robot_id
        delivered = slow = 0
        for group in (self._by_session.get(message.session_id, _NOBODY), self._global):
            for subscriber in group:
                if subscriber.closed or (
                    subscriber.robot_id is not None and subscriber.robot_id != robot_id
                ):
                    continue
                pending = subscriber._pending
                if len(pending) >= subscriber._limit:
                    subscriber.close(SLOW_CONSUMER)
                    slow += 1
                    continue
                pending.append(event)
                delivered += 1
                if len(pending) > 1:  # already woken or handed over
                    continue
                if subscriber.transport is not None and on_idle_ready is not None:
                    on_idle_ready(subscriber)
                    continue
                waiter = subscriber._waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        counters = self.counters
        counters.messages_routed += 1
        counters.events_delivered += delivered
        counters.slow_consumer_disconnects += slow
        return delivered

    def heartbeat(self) -> None:
        """Queue one heartbeat, encoded once, to every subscriber."""
        event = Event(0, encode_heartbeat())
        for subscriber in self.subscribers():
            if not subscriber.closed and not subscriber.push(event):
                self.counters.slow_consumer_disconnects += 1

    def close_all(self, reason: str) -> None:
        """Close every subscriber with `reason` (shutdown)."""
        for subscriber in list(self.subscribers()):
            subscriber.close(reason)

    def subscribers(self) -> Iterator[Subscriber]:
        yield from self._global
        for group in self._by_session.values():
            yield from group

    def channels(self) -> dict[str, int]:
        """Open streams per logical channel; channels with none are absent."""
        counts = {channel_of(session): len(group) for session, group in self._by_session.items()}
        if self._global:
            counts[GLOBAL_CHANNEL] = len(self._global)
        return counts
