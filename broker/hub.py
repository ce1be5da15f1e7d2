"""Subscribers and routing, with no I/O; and the one owner of "nothing twice".

The hub holds every open stream's `Subscriber`, indexed by session, and routes each message to
the subscribers of its session and to the global ones, checking a subscriber's robot filter.
A stream of several sessions (`sessionId` repeated) is indexed under each of them: a row has
one session, so it reaches such a stream once, and routing costs what it did.
Each event is encoded once; all its subscribers queue the same bytes (`subscriber.fan_out`).
A subscriber's queue is bounded: when it is full the subscriber is closed (slow consumer) and
its client resumes by replay, so one slow reader never delays the others and memory stays
bounded.

Everything here runs on the event loop thread and never awaits while routing, so a subscriber
added between two notifications sees exactly the later one, which the replay merge relies on.

Nothing twice: a stream receives each row at most once, whichever way it comes (live, a
replay or history read from the table, a backfill after an outage, a bus entry appended
twice). The hub applies the whole rule:

- `publish` routes a row only if the journal does not hold it already (a backfill's overlap
  with notifications, a bus entry appended twice); its callers (the listener, the bus reader)
  hand it every row they get.
- `mark_sent` records what a read of the table sent a stream (`replay.py`), right after the
  read and before any await: copies already queued are dropped, and `publish` skips the rest
  when it reaches them (`subscriber.Seen` holds that state, per stream).
- Rows that committed before a resume's position and were never journaled count as sent:
  `mark_sent`'s floor (`replay.py` gives the cases).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import structlog

from .changes import Change
from .errors import AtCapacity
from .events import Message, encode_heartbeat, encode_message
from .filters import Sessions
from .journal import Journal
from .latency import LatencyHistogram
from .subscriber import (
    DEFAULT_QUEUE_BYTES,
    GLOBAL_CHANNEL,
    Event,
    Seen,
    Subscriber,
    channel_of,
    extra_slots,
    fan_out,
    slot_bytes,
)

__all__ = ["GLOBAL_CHANNEL", "Event", "Hub", "HubCounters", "Subscriber", "channel_of"]

JOURNAL_SIZE = 50_000
log = structlog.get_logger(logger_name=__name__)
_NOBODY: frozenset[Subscriber] = frozenset()


@dataclass(slots=True)
class HubCounters:
    """Monotonic counters, read by stats and `/metrics` at scrape time."""

    messages_routed: int = 0
    events_delivered: int = 0
    slow_consumer_disconnects: int = 0
    rejected_connections: int = 0
    replayed_events: int = 0
    ids_reused: int = 0
    delivery_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(slots=True)
class Hub:
    """Every subscriber of this process, and the routing of messages to them."""

    max_subscribers: int
    queue_size: int
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    journal: Journal = field(default_factory=lambda: Journal(JOURNAL_SIZE))
    # Called, instead of waking its task, for a subscriber with a sink that just got its
    # first queued event (`Flusher.mark`).
    on_idle_ready: Callable[[Subscriber], None] | None = None
    counters: HubCounters = field(default_factory=HubCounters)
    _by_session: dict[str, set[Subscriber]] = field(default_factory=dict)
    _global: set[Subscriber] = field(default_factory=set)
    _count: int = 0
    reused_from: int | None = None  # the lowest id found reused (`_is_new`), None if none

    def __len__(self) -> int:
        return self._count

    def subscribe(self, sessions: Sessions, robot_id: str | None) -> Subscriber:
        """Register a subscriber of `sessions` (one, several, or None: all). Raises
        `AtCapacity` at `max_subscribers`; a stream counts once, whatever its sessions."""
        if self._count >= self.max_subscribers:
            self.counters.rejected_connections += 1
            raise AtCapacity("too many connections: retry later")
        subscriber = Subscriber(sessions, robot_id, self.queue_size, self.queue_bytes)
        if subscriber.sessions is None:
            self._global.add(subscriber)
        else:
            for session_id in subscriber.sessions:
                self._by_session.setdefault(session_id, set()).add(subscriber)
        self._count += 1
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Remove a subscriber; safe to call more than once."""
        if subscriber.sessions is None:
            if subscriber not in self._global:
                return
            self._global.discard(subscriber)
        else:
            first = self._by_session.get(subscriber.sessions[0], _NOBODY)
            if subscriber not in first:
                return
            for session_id in subscriber.sessions:
                group = self._by_session[session_id]
                group.discard(subscriber)
                if not group:
                    del self._by_session[session_id]
        self._count -= 1

    def publish(self, message: Message) -> int:
        """Route one message to every matching subscriber that lacks it; returns how many
        queued it, 0 for a copy of a row the journal holds (`_is_new`).

        A subscriber whose stream idles with a sink (`Subscriber.sink`) is handed to
        `on_idle_ready` instead of having its stream task woken (see `flusher.py`).
        """
        if not self._is_new(message):
            return 0
        self.journal.append(message.id, message.session_id, message.robot_id, message.created_at)
        data = encode_message(message)
        # Slots it takes past the first: 0 but for a large event (subscriber.py).
        extra = extra_slots(len(data), slot_bytes(self.queue_size, self.queue_bytes))
        delivered, slow = fan_out(
            (self._by_session.get(message.session_id, _NOBODY), self._global),
            Event(message.id, data, time.perf_counter()),
            extra,
            message.robot_id,
            self.on_idle_ready,
        )
        counters = self.counters
        counters.messages_routed += 1
        counters.events_delivered += delivered
        counters.slow_consumer_disconnects += slow
        return delivered

    def publish_change(self, change: Change) -> int:
        """Route an update or delete of the messages feed (declared in `BROKER_CONFIG`): the
        service's feed registry routes the messages feed's changes here, every other feed's
        to its `FeedHub`. How many queued it."""
        return 0

    def _is_new(self, message: Message) -> bool:
        """Whether `message` is still to be routed: False for a copy of a row the journal
        holds (a backfill's overlap, a bus entry appended twice).

        A row whose id the journal holds with another `created_at` is not a copy: the
        table's ids were reused (`TRUNCATE ... RESTART IDENTITY`, a point-in-time restore)
        while this broker ran. Every id it has seen then names another row, so the journal
        and every stream's record of rows sent are forgotten and the row is routed: it
        reaches its own session's live streams, and resumes read from the table (filtered
        by the row as stored) from here on. Only a signed row (`signing.py`) gets here, so
        no forged one can cause this. `reused_from` keeps the lowest reused id, for the
        listener's next backfill.
        """
        journal = self.journal
        if message.id not in journal:
            return True
        if journal.created_at(message.id) == message.created_at:
            return False
        log.error("row_ids_reused", id=message.id, journal_rows=len(journal))
        journal.clear()
        for subscriber in self.subscribers():
            subscriber.seen = None
        self.counters.ids_reused += 1
        self.reused_from = min(self.reused_from or message.id, message.id)
        return True

    def mark_sent(self, subscriber: Subscriber, ids: Collection[int], floor: int = 0) -> None:
        """Record that `subscriber` was sent rows `ids` from the table, and that every row up
        to `floor` counts as sent: copies already queued are dropped, and routing skips the
        rest when it reaches them. Call it right after the read, before any await."""
        seen = subscriber.seen
        if seen is None:
            seen = subscriber.seen = Seen()
        seen.floor = max(seen.floor, floor)
        fresh = [i for i in ids if i > seen.floor]
        seen.to_skip.update(fresh)
        subscriber.drop_seen()
        # A row the journal holds was routed already (to the queue just emptied of it, or
        # before this stream subscribed): it will not be routed again.
        seen.to_skip.difference_update(i for i in fresh if i in self.journal)

    def heartbeat(self) -> None:
        """Queue one heartbeat, encoded once, to every open subscriber, the way `publish`
        queues a message (`fan_out`: an event with id 0 passes every filter). Each subscriber
        once, a stream of several sessions too."""
        event = Event(0, encode_heartbeat())
        _, slow = fan_out((list(self.subscribers()),), event, 0, None, self.on_idle_ready)
        self.counters.slow_consumer_disconnects += slow

    def close_all(self, reason: str) -> None:
        """Close every subscriber with `reason` (shutdown)."""
        for subscriber in list(self.subscribers()):
            subscriber.close(reason)

    def subscribers(self) -> Iterator[Subscriber]:
        """Every subscriber once (one of several sessions is listed under its first)."""
        yield from self._global
        for session_id, group in self._by_session.items():
            for subscriber in group:
                if subscriber.sessions is None or subscriber.sessions[0] == session_id:
                    yield subscriber

    def channels(self) -> dict[str, int]:
        """Open streams per logical channel; channels with none are absent. A stream of
        several sessions counts under each of them."""
        counts = {channel_of(session): len(group) for session, group in self._by_session.items()}
        if self._global:
            counts[GLOBAL_CHANNEL] = len(self._global)
        return counts
