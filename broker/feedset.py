"""The feeds this broker serves, by name: the messages feed's `Hub` and a `FeedHub` for every
other feed the feeds file (`BROKER_CONFIG`) declares.

The listener (or the bus reader) hands every change to `route`: a generic feed's to its
`FeedHub.publish`, the messages feed's updates and deletes to `Hub.publish_change`. A change
of a feed this process does not serve (the file changed while a trigger stayed installed, or
another deployment's feed on a shared database) is dropped, and logged once per feed.

Everything that concerns every stream goes through here: the connection cap
(`BROKER_MAX_CONNECTIONS`) counts the streams of every feed together (`admit`), heartbeats
reach every hub, and shutdown closes them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import structlog

from .changes import Change
from .config.feeds import MESSAGES, Feed
from .errors import AtCapacity
from .feedhub import FeedHub
from .hub import Hub
from .subscriber import Subscriber

__all__ = ["FeedSet"]

log = structlog.get_logger(logger_name=__name__)


class FeedSet:
    """The messages hub and one `FeedHub` per declared generic feed."""

    def __init__(self, hub: Hub, feeds: Sequence[Feed] = ()) -> None:
        self.hub = hub
        self.declared = {feed.name: feed for feed in feeds}
        self.generic: dict[str, FeedHub] = {
            feed.name: FeedHub(feed, hub.queue_size, hub.queue_bytes)
            for feed in feeds
            if not feed.is_messages
        }
        for generic in self.generic.values():  # one delivery latency for the process
            generic.counters.delivery_latency = hub.counters.delivery_latency
        self._unknown: set[str] = set()

    def __len__(self) -> int:
        """Streams open on every feed."""
        return len(self.hub) + sum(len(feed) for feed in self.generic.values())

    def __iter__(self) -> Iterator[FeedHub]:
        return iter(self.generic.values())

    def get(self, name: str) -> FeedHub | None:
        """The generic feed `name`, None if no such feed is declared (or it is messages)."""
        return self.generic.get(name)

    @property
    def captured(self) -> list[str]:
        """Feeds whose changes the log holds: every generic one, and messages when its
        updates or deletes are declared."""
        names = list(self.generic)
        messages = self.declared.get(MESSAGES)
        if messages is not None and set(messages.events) - {"insert"}:
            names.append(MESSAGES)
        return names

    def set_on_idle_ready(self, mark: Callable[[Subscriber], None]) -> None:
        self.hub.on_idle_ready = mark
        for feed in self.generic.values():
            feed.on_idle_ready = mark

    def admit(self) -> None:
        """Raise `AtCapacity` when the streams of every feed together reach the cap."""
        if len(self) >= self.hub.max_subscribers:
            self.hub.counters.rejected_connections += 1
            raise AtCapacity("too many connections: retry later")

    def route(self, change: Change) -> int:
        """Route one change to its feed's hub; how many streams queued it."""
        feed = self.generic.get(change.feed)
        if feed is not None:
            return feed.publish(change)
        if change.feed == MESSAGES:
            return self.hub.publish_change(change)
        if change.feed not in self._unknown:
            self._unknown.add(change.feed)
            log.warning("change_of_undeclared_feed", feed=change.feed, position=change.position)
        return 0

    def holds(self, feed: str, position: int) -> bool:
        """Whether `feed`'s journal holds the change at `position` (routed already)."""
        hub = self.generic.get(feed)
        if hub is not None:
            return position in hub.journal
        return position in self.hub.journal

    def forgotten_up_to(self, feed: str) -> int:
        """The highest position `feed`'s journal dropped to keep its size."""
        hub = self.generic.get(feed)
        return (hub.journal if hub is not None else self.hub.journal).forgotten_up_to

    def remember(self, change: Change) -> None:
        """Record a change as delivered without routing it (a bus reader's preload of the
        stream's tail), so resume from it is exact; the messages feed's are left out."""
        feed = self.generic.get(change.feed)
        if feed is not None:
            feed.remember(change)

    def forget_changes(self) -> None:
        """Forget every generic feed's journal (a bus reader that missed entries)."""
        for feed in self.generic.values():
            feed.forget()

    def heartbeat(self) -> None:
        self.hub.heartbeat()
        for feed in self.generic.values():
            feed.heartbeat()

    def close_all(self, reason: str) -> None:
        self.hub.close_all(reason)
        for feed in self.generic.values():
            feed.close_all(reason)
