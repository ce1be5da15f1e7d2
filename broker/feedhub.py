"""One generic feed's subscribers and the routing of its changes to them (`hub.py` does the
messages feed); with no I/O, on the event loop thread, never awaiting while routing.

A stream of a feed names key values (none: the feed's global stream; several: the key
repeated, as `sessionId`) and equalities on filter columns. The hub indexes streams by key
value and checks the filters in memory, as text, the way `data ->> column` writes a value
(`as_text`), so the same rule holds live, in the journal and in the change log's SQL
(`feeds/changelog.py`):

- an insert goes to streams that match its row;
- an update to streams that match the new row OR the old one (the new row overlaid with
  `old`, which holds the previous values of the key and filters that changed), so a stream
  sees a row leave its filter as well as enter it;
- a delete to streams that match the old row (`data` holds its key, filters and primary key).

A change is encoded once (`changes.encode_change`); the matching streams are picked first,
then queued in one `subscriber.fan_out` call, with the same bounded queues, slow-consumer rule
and idle-sink hand-over as messages.

Nothing twice, as `hub.py` does it for rows: `publish` routes a position only if the journal
does not hold it (a backfill's overlap with notifications, a bus entry appended twice), and
`mark_sent` records what a read of the log sent a stream (`feedreplay.py`), through the same
`subscriber.Seen`. The journal keeps, for the last `JOURNAL_SIZE` changes, their positions in
delivery order (commit order: NOTIFY is delivered so) with their route values, so a resume
from a position it holds is exact even when transactions committed out of position order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import orjson

from .changes import Change, encode_change
from .config.feeds import Feed
from .events import data_line, encode_heartbeat, utc_timestamp
from .hub import JOURNAL_SIZE, HubCounters
from .subscriber import (
    DEFAULT_QUEUE_BYTES,
    Event,
    Subscriber,
    extra_slots,
    fan_out,
    mark_sent,
    slot_bytes,
)

__all__ = ["ChangeJournal", "FeedFilter", "FeedHub", "Route", "as_text", "route_views"]

Route = Mapping[str, str | None]  # a change's key and filter columns, as text (`as_text`)
_NOBODY: frozenset[Subscriber] = frozenset()


def as_text(value: Any) -> str | None:
    """A JSON value as `->>` writes it, for matching: strings as they are, numbers in their
    decimal text, booleans `true`/`false`, JSON null None (it matches no given value).

    A numeric with trailing zeros (`10.50`) comes back from JSON as the float 10.5, written
    `10.5` here but `10.50` by PostgreSQL: key and filter columns are meant to be text,
    integers, booleans or enums, whose texts agree."""
    if value is None or isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value).decode()


def route_views(feed: Feed, change: Change) -> tuple[Route, ...]:
    """The rows a change is matched on: its row (the new one; a delete's old one) and, for an
    update that moved the row's key or filters, the old one too."""
    columns = (feed.key, *feed.filters)
    data = change.data
    new = {column: as_text(data.get(column)) for column in columns}
    old = change.old
    if change.op != "update" or not old:
        return (new,)
    before = dict(new)
    for column in columns:
        if column in old:
            before[column] = as_text(old[column])
    return (new,) if before == new else (new, before)


@dataclass(frozen=True, slots=True)
class FeedFilter:
    """What a stream of a feed takes: key values (None: any) and filter equalities."""

    key: str
    keys: frozenset[str] | None
    filters: tuple[tuple[str, str], ...] = ()

    def matches(self, views: tuple[Route, ...]) -> bool:
        """True if any of a change's rows (`route_views`) matches."""
        keys, filters, key = self.keys, self.filters, self.key
        for view in views:
            if keys is not None and view.get(key) not in keys:
                continue
            if all(view.get(column) == value for column, value in filters):
                return True
        return False


class ChangeJournal:
    """The last `size` changes delivered, in delivery order: position and route values."""

    def __init__(self, size: int = JOURNAL_SIZE) -> None:
        if size < 1:
            raise ValueError(f"journal size must be at least 1, got {size}")
        self.size = size
        self._entries: deque[tuple[int, tuple[Route, ...]]] = deque()
        self._index: dict[int, int] = {}
        self._first = 0  # index of self._entries[0]; only grows
        self.forgotten_up_to = 0  # the highest position dropped to keep the size

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, position: object) -> bool:
        return position in self._index

    @property
    def newest(self) -> int | None:
        return self._entries[-1][0] if self._entries else None

    def append(self, position: int, views: tuple[Route, ...]) -> None:
        self._index[position] = self._first + len(self._entries)
        self._entries.append((position, views))
        if len(self._entries) > self.size:
            old, _ = self._entries.popleft()
            del self._index[old]
            self._first += 1
            self.forgotten_up_to = max(self.forgotten_up_to, old)

    def after(self, position: int, wanted: FeedFilter) -> list[int] | None:
        """Positions delivered after `position` that `wanted` takes, in delivery order; None
        when the journal does not hold `position` (the caller reads the log by position)."""
        index = self._index.get(position)
        if index is None:
            return None
        later = islice(self._entries, index - self._first + 1, None)
        return [p for p, views in later if wanted.matches(views)]


class FeedHub:
    """Every stream of one generic feed in this process, and the routing of its changes.
    The connection cap counts streams of every feed together: the service's registry
    (`feedset.py`) checks it before `subscribe`."""

    def __init__(
        self,
        feed: Feed,
        queue_size: int,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        journal_size: int = JOURNAL_SIZE,
    ) -> None:
        self.feed = feed
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.journal = ChangeJournal(journal_size)
        self.counters = HubCounters()
        # Called, instead of waking its task, for a subscriber with a sink that just got its
        # first queued event (`Flusher.mark`).
        self.on_idle_ready: Callable[[Subscriber], None] | None = None
        self._by_key: dict[str, set[Subscriber]] = {}
        self._global: set[Subscriber] = set()
        self._filters: dict[Subscriber, FeedFilter] = {}
        self._unit = slot_bytes(queue_size, queue_bytes)

    def __len__(self) -> int:
        return len(self._filters)

    @property
    def name(self) -> str:
        return self.feed.name

    def subscribe(self, keys: tuple[str, ...] | None, filters: Mapping[str, str]) -> Subscriber:
        """Register a stream of key values `keys` (None: every key) whose filter columns equal
        `filters`."""
        subscriber = Subscriber(keys, None, self.queue_size, self.queue_bytes, feed=self.feed.name)
        sessions = subscriber.sessions  # the keys, repeats dropped
        wanted = FeedFilter(
            self.feed.key,
            None if sessions is None else frozenset(sessions),
            tuple(sorted(filters.items())),
        )
        self._filters[subscriber] = wanted
        if sessions is None:
            self._global.add(subscriber)
        else:
            for key in sessions:
                self._by_key.setdefault(key, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Remove a stream; safe to call more than once."""
        if self._filters.pop(subscriber, None) is None:
            return
        if subscriber.sessions is None:
            self._global.discard(subscriber)
            return
        for key in subscriber.sessions:
            group = self._by_key.get(key)
            if group is not None:
                group.discard(subscriber)
                if not group:
                    del self._by_key[key]

    def filter_of(self, subscriber: Subscriber) -> FeedFilter:
        return self._filters[subscriber]

    def connected(self, subscriber: Subscriber, retry_ms: int | None = None) -> bytes:
        """The stream's first event: `connected`, with the feed and the stream's filter (the
        key's values as a list, absent for the global stream)."""
        wanted = self._filters[subscriber]
        shown: dict[str, Any] = {}
        if subscriber.sessions is not None:
            shown[wanted.key] = list(subscriber.sessions)
        shown.update(wanted.filters)
        body = {
            "type": "connected",
            "message": "SSE connected",
            "timestamp": utc_timestamp(),
            "feed": self.feed.name,
            "filters": shown,
        }
        return (b"" if retry_ms is None else b"retry: %d\n" % retry_ms) + data_line(body)

    def publish(self, change: Change) -> int:
        """Route one change to every stream it matches that lacks it; how many queued it, 0
        for a copy of a change the journal holds."""
        position = change.position
        journal = self.journal
        if position in journal:
            return 0
        views = route_views(self.feed, change)
        journal.append(position, views)
        counters = self.counters
        counters.messages_routed += 1
        matching = self._matching(views)
        if not matching:
            return 0
        data = encode_change(change)
        delivered, slow = fan_out(
            (matching,),
            Event(position, data, time.perf_counter()),
            extra_slots(len(data), self._unit),
            None,
            self.on_idle_ready,
        )
        counters.events_delivered += delivered
        counters.slow_consumer_disconnects += slow
        return delivered

    def remember(self, change: Change) -> None:
        """Journal a change without routing it (`FeedSet.remember`)."""
        if change.position not in self.journal:
            self.journal.append(change.position, route_views(self.feed, change))

    def forget(self) -> None:
        """A new, empty journal: resumes then read by position from the log."""
        self.journal = ChangeJournal(self.journal.size)

    def _matching(self, views: tuple[Route, ...]) -> list[Subscriber]:
        """The streams a change with these rows goes to, each once."""
        key = self.feed.key
        by_key = self._by_key
        groups = [self._global]
        seen_keys: set[str | None] = set()
        for view in views:
            value = view.get(key)
            if value is not None and value not in seen_keys:
                seen_keys.add(value)
                groups.append(by_key.get(value, _NOBODY))  # type: ignore[arg-type]
        filters = self._filters
        found: dict[Subscriber, None] = {}
        for group in groups:
            for subscriber in group:
                if subscriber not in found and filters[subscriber].matches(views):
                    found[subscriber] = None
        return list(found)

    def mark_sent(self, subscriber: Subscriber, positions: Collection[int], floor: int = 0) -> None:
        """Record that `subscriber` was sent changes `positions` read from the log, and that
        every change up to `floor` counts as sent (`Hub.mark_sent`, for changes). Call it
        right after the read, before any await."""
        mark_sent(subscriber, positions, floor, self.journal)

    def heartbeat(self) -> None:
        """Queue one heartbeat, encoded once, to every open stream (`Hub.heartbeat`)."""
        if not self._filters:
            return
        event = Event(0, encode_heartbeat())
        _, slow = fan_out((list(self._filters),), event, 0, None, self.on_idle_ready)
        self.counters.slow_consumer_disconnects += slow

    def close_all(self, reason: str) -> None:
        for subscriber in list(self._filters):
            subscriber.close(reason)

    def subscribers(self) -> Iterator[Subscriber]:
        yield from self._filters

    def channels(self) -> dict[str, int]:
        """Open streams per channel, `<feed>:<key value>` and `<feed>:global`; a stream of
        several key values counts under each."""
        name = self.feed.name
        counts = {f"{name}:{key}": len(group) for key, group in self._by_key.items()}
        if self._global:  # added to a key named `global`, if any (no key value is reserved)
            counts[f"{name}:global"] = counts.get(f"{name}:global", 0) + len(self._global)
        return counts
