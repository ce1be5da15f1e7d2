"""One open stream as the hub sees it: its filter, its bounded queue, and what it already has;
and the two loops that fill and empty those queues on the hot path.

A `Subscriber` queues the encoded events the hub routes to it, up to `queue_size` events and
`queue_bytes` bytes; a full queue, by either, closes it (slow consumer): a count alone let a
client that never read hold hundreds of MB (docs/security.md).

Both bounds are one count of slots: the queue has `queue_size` slots of `unit` =
`queue_bytes // queue_size` bytes (4 KiB by default). An event takes one slot per `unit` of its
size (`len` of the shared bytes, no copy), at least one, so small events fill the queue exactly
as the count did, and large ones fill it by bytes: at most `queue_size * unit` bytes are
queued. The fan-out checks `len(queue) + extra >= limit`, where `extra` (the slots past the
first) is worked out once per event: a separate byte count per subscriber made `Hub.publish`
30% slower per delivery. An empty queue takes one event whatever its size, so a row larger
than the budget still reaches a reader that keeps up.

The queue is private to this module. Two loops here touch it without a method call per
subscriber, because they run once per delivery (`make bench`, fanout; docs/benchmarks.md):
`fan_out`, which queues an event for many subscribers and then wakes each stream's task or
hands an idle one to its sink's writer ("queue, then wake or hand to the sink", written only
there), and `write_to_sinks`, the flusher's write of idle streams' queues.

`Seen` is the state of the hub's "nothing twice" rule (`hub.py`): the rows a stream was sent
outside routing (a replay or history, read from the table), which `fan_out` skips when it
reaches them and `Subscriber.drop_seen` removes from the queue.

A `Sink` is where an idle stream's events may be written without waking its task: the
server's socket, behind an interface that knows nothing of HTTP here (`server/sink.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Container, Iterable
from dataclasses import dataclass
from typing import Protocol

from .filters import Filter, Sessions

__all__ = [
    "DEFAULT_QUEUE_BYTES",
    "GLOBAL_CHANNEL",
    "SLOW_CONSUMER",
    "Event",
    "Seen",
    "Sink",
    "Subscriber",
    "channel_of",
    "channels_of",
    "extra_slots",
    "fan_out",
    "mark_sent",
    "slot_bytes",
    "write_to_sinks",
]

MESSAGES_CHANNELS = "session_messages"  # the messages feed's channels' prefix in stats and logs
GLOBAL_CHANNEL = f"{MESSAGES_CHANNELS}:global"
SLOW_CONSUMER = "slow consumer: reconnect to resume"
DEFAULT_QUEUE_BYTES = 4 * 1024 * 1024  # as `BROKER_QUEUE_BYTES`


def slot_bytes(queue_size: int, queue_bytes: int) -> int:
    """The bytes of one of a queue's slots (the module docstring)."""
    return max(1, queue_bytes // queue_size)


def extra_slots(size: int, unit: int) -> int:
    """The slots past the first that an event of `size` bytes takes (module docstring)."""
    return (size - 1) // unit if size > unit else 0


def channel_of(session_id: str | None, prefix: str = MESSAGES_CHANNELS) -> str:
    """The logical channel a stream is counted under in stats and logs: `prefix` is
    `session_messages` for the messages feed, a feed's name for the others."""
    return f"{prefix}:{'global' if session_id is None else session_id}"


def channels_of(sessions: tuple[str, ...] | None, prefix: str = MESSAGES_CHANNELS) -> list[str]:
    """Every channel a stream of `sessions` (None: the global stream) is counted under."""
    if sessions is None:
        return [channel_of(None, prefix)]
    return [channel_of(s, prefix) for s in sessions]


@dataclass(frozen=True, slots=True)
class Event:
    """Encoded bytes of one event, shared by its subscribers; `id` is the row id, or 0 for an
    event every open stream gets whatever its filter (a heartbeat). `born` is the
    `time.perf_counter()` of its routing (0 for heartbeats), for latency."""

    id: int
    data: bytes
    born: float = 0.0


class Sink(Protocol):
    """Where an idle stream's events go straight out, as part of its response body."""

    def write(self, data: bytes) -> bool:
        """Send `data` now, or refuse (False) when it cannot be taken at once: the socket
        still holds earlier bytes or is closing. A refusal writes nothing."""
        ...


class Seen:
    """Rows a stream already has from a read of the table: every id up to `floor`, and the
    ids in `to_skip` above it, which the hub has yet to route (a notification in flight, or
    a backfill after an outage). Each of those is skipped once, then forgotten."""

    __slots__ = ("floor", "to_skip")

    def __init__(self) -> None:
        self.floor = 0
        self.to_skip: set[int] = set()

    def __contains__(self, message_id: object) -> bool:
        return isinstance(message_id, int) and (
            0 < message_id <= self.floor or message_id in self.to_skip
        )

    def skip(self, message_id: int) -> bool:
        """True if the stream has row `message_id` already (the hub then does not queue it);
        never for id 0 (a heartbeat)."""
        if message_id <= self.floor:
            return message_id > 0
        if message_id in self.to_skip:
            self.to_skip.discard(message_id)
            return True
        return False


class Subscriber:
    """One open stream's filter and bounded queue of encoded events. `sessions` is one
    session id, several (a tuple: `sessionId` repeated), or None for the global stream."""

    __slots__ = (
        "_limit",
        "_loop",
        "_pending",
        "_size",
        "_waiter",
        "close_reason",
        "closed",
        "direct_sent",
        "feed",
        "filter",
        "on_close",
        "robot_id",
        "seen",
        "sessions",
        "sink",
        "unit",
    )

    def __init__(
        self,
        sessions: Sessions,
        robot_id: str | None,
        queue_size: int,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        feed: str = MESSAGES_CHANNELS,
    ) -> None:
        self.feed = feed  # names its channels: `session_messages`, or a feed's name
        self.filter = Filter.of(sessions, robot_id)
        self.sessions = self.filter.sessions
        self.robot_id = robot_id  # read by the hub's routing loop: a slot, not a property
        self.closed = False
        self.close_reason: str | None = None
        self.on_close: Callable[[], None] | None = None
        # A list, not a deque: an empty deque allocates a 64-slot block (~700 B per stream).
        self._pending: list[Event] = []
        # Slots: `_limit` is `queue_size` less the extra slots of the large events queued;
        # whoever empties `_pending` resets it to `_size` (`take`, `write_to_sinks`).
        self._size = self._limit = queue_size
        self.unit = slot_bytes(queue_size, queue_bytes)
        self._waiter: asyncio.Future[None] | None = None
        # Set by a live stream while it idles with nothing queued: where `write_to_sinks`
        # writes what is routed to it.
        self.sink: Sink | None = None
        self.direct_sent = 0
        # Set by `Hub.mark_sent` for a stream sent rows from the table (resume, history).
        self.seen: Seen | None = None
        # Kept, not looked up per wait: on CPython 3.11 get_running_loop() costs a getpid().
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def session_id(self) -> str | None:
        """The first session named, None for the global stream."""
        return self.filter.session_id

    @property
    def channel(self) -> str:
        """The channel of the first session (for logs); `channels` names them all."""
        return channel_of(self.session_id, self.feed)

    @property
    def channels(self) -> list[str]:
        return channels_of(self.sessions, self.feed)

    def push(self, event: Event) -> bool:
        """Queue `event` for this subscriber alone, as `fan_out` does (waking its task); at a
        full queue close the subscriber instead. True if queued."""
        extra = extra_slots(len(event.data), self.unit)
        return fan_out(((self,),), event, extra, self.robot_id, None)[0] == 1

    def take(self) -> list[Event]:
        """Every queued event, oldest first, leaving the queue empty."""
        events, self._pending = self._pending, []
        self._limit = self._size
        return events

    def drop_seen(self) -> None:
        """Remove queued events of rows the stream already has (`seen`)."""
        seen = self.seen
        if seen is not None and any(event.id in seen for event in self._pending):
            self._pending = [event for event in self._pending if event.id not in seen]
            extra = (extra_slots(len(event.data), self.unit) for event in self._pending)
            self._limit = self._size - sum(extra)

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
        self._limit = self._size
        self.wake()
        if self.on_close is not None:
            self.on_close()

    def wake(self) -> None:
        """Wake the stream's task if it waits (it then writes what is queued)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def mark_sent(
    subscriber: Subscriber, ids: Collection[int], floor: int, routed: Container[int]
) -> None:
    """Record that `subscriber` was sent `ids` outside routing (a read of the table or the
    log), and that every id up to `floor` counts as sent: copies already queued are dropped,
    and routing skips the rest when it reaches them. An id in `routed` (the journal) was
    routed already, to the queue just emptied of it or before the stream subscribed: it will
    not be routed again, so nothing is kept to skip it. The rule of `hub.py` and `feedhub.py`;
    call it right after the read, before any await."""
    seen = subscriber.seen
    if seen is None:
        seen = subscriber.seen = Seen()
    seen.floor = max(seen.floor, floor)
    fresh = [i for i in ids if i > seen.floor]
    seen.to_skip.update(fresh)
    subscriber.drop_seen()
    seen.to_skip.difference_update(i for i in fresh if i in routed)


def fan_out(
    groups: Iterable[Iterable[Subscriber]],
    event: Event,
    extra: int,
    robot_id: str | None,
    on_idle_ready: Callable[[Subscriber], None] | None,
) -> tuple[int, int]:
    """Queue `event` for every open subscriber of `groups` whose robot filter takes
    `robot_id` and that does not have the row already (`seen`); returns how many queued it
    and how many were closed instead (slow consumers). `extra` is `extra_slots` of the event.

    A subscriber whose queue was empty is then woken, or, when its stream idles with a sink,
    handed to `on_idle_ready` (`Flusher.mark`) instead of having its task woken.

    The hot path: the queueing and the wake-up are inlined here (measured 3x faster per
    subscriber than a method call and a generator over the candidate sets).
    """
    message_id = event.id
    delivered = slow = 0
    for group in groups:
        for subscriber in group:
            if subscriber.closed or (
                subscriber.robot_id is not None and subscriber.robot_id != robot_id and message_id
            ):
                continue
            seen = subscriber.seen
            if seen is not None and seen.skip(message_id):
                continue
            pending = subscriber._pending
            if len(pending) + extra >= subscriber._limit and pending:
                subscriber.close(SLOW_CONSUMER)
                slow += 1
                continue
            if extra:
                subscriber._limit -= extra
            pending.append(event)
            delivered += 1
            if len(pending) > 1:  # already woken or handed over
                continue
            if subscriber.sink is not None and on_idle_ready is not None:
                on_idle_ready(subscriber)
                continue
            waiter = subscriber._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
    return delivered, slow


def write_to_sinks(marked: list[Subscriber], observe: Callable[[float, int], None]) -> None:
    """Write each of `marked`'s queue to its sink in one write, leaving it empty; a sink that
    refuses gets nothing, and the stream's task is woken instead (its ASGI send applies flow
    control). A subscriber whose task took over meanwhile (no sink, closed, nothing queued)
    is passed over. Each event's latency is given to `observe` once, with its count: every
    subscriber of a fan-out was routed the same event."""
    now = time.perf_counter()
    last: Event | None = None
    times = 0
    for subscriber in marked:
        sink = subscriber.sink
        pending = subscriber._pending
        if sink is None or subscriber.closed or not pending:
            continue
        body = pending[0].data if len(pending) == 1 else b"".join([e.data for e in pending])
        if not sink.write(body):
            subscriber.wake()
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
        subscriber._limit = subscriber._size
    if last is not None:
        observe(now - last.born, times)
