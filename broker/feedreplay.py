"""What a stream of a generic feed is sent before live: the changes it missed (resume) or the
last ones (history); `replay.py` does the same for the messages feed, from its table.

The stream is subscribed first, so every change its `FeedHub` routes from then on is queued
for it; then the changes are read from the change log (`feeds/changelog.py`); then
`FeedHub.mark_sent` records what each read sent, before the next await, so a copy queued
meanwhile is dropped and one routed later is skipped. Case by case:

- Resume from a position N the feed's journal holds: the changes delivered here after N that
  match, in delivery (commit) order, read from the log by position, then live. Exact, even
  when transactions committed out of position order.
- Resume from a position N the journal does not hold (this process started after N, or N is
  older than the journal): every change up to N counts as sent; changes above N come once
  each, in position order, read from the log a bounded page at a time, then live. A change
  with a position below N that commits after the resume is not sent (the ordering window,
  as for rows).
- `history=H`: the last H changes that match, oldest first, then live: a resume from just
  before the oldest of them.
- A resume from a position below the feed's pruning watermark (`BROKER_RETENTION`): changes
  after it may be gone, so the stream gets `reset` (`{"type":"reset","reason":"history
  expired"}`) instead of a replay, then live: the client refetches what it shows. Likewise if
  a change the journal lists was pruned before it could be read.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from .changes import Change, encode_change
from .events import encode_reset
from .feedhub import FeedHub
from .feeds import changelog
from .store import Store
from .subscriber import Subscriber

__all__ = ["RESET", "FeedReplay"]

PAGE = 500  # changes read at a time, at most
RESET = encode_reset()  # an item of its own: `encode` passes bytes through


@dataclass
class FeedReplay:
    """The changes one new stream of a generic feed is sent before live (a `Backlog`)."""

    feed: FeedHub
    store: Store
    subscriber: Subscriber
    limit: int
    after: int = 0  # resume by position after this one (and count every one up to it as sent)
    journal_positions: list[int] | None = None  # resume from the journal: these, in this order
    history: int = 0  # the last `history` changes first
    reset: bool = False  # whether the stream was sent `reset` (for tests and logs)

    @staticmethod
    def encode(item: Change | bytes) -> bytes:
        return item if isinstance(item, bytes) else encode_change(item)

    @classmethod
    def plan(
        cls,
        feed: FeedHub,
        store: Store,
        subscriber: Subscriber,
        *,
        last_event_id: int | None,
        history: int | None,
        limit: int,
    ) -> FeedReplay | None:
        """The replay of a stream that has just subscribed, or None for live only; in the
        same event-loop step as `FeedHub.subscribe`. `history` is ignored with a resume."""
        if last_event_id is None:
            return None if history is None else cls(feed, store, subscriber, limit, history=history)
        positions = feed.journal.after(last_event_id, feed.filter_of(subscriber))
        if positions is None:
            feed.mark_sent(subscriber, (), floor=last_event_id)  # at once: a backfill may run
        return cls(feed, store, subscriber, limit, last_event_id, positions)

    def _match(self) -> changelog.Match:
        wanted = self.feed.filter_of(self.subscriber)
        keys = self.subscriber.sessions
        return changelog.Match(None if keys is None else list(keys), dict(wanted.filters))

    async def pages(self) -> AsyncGenerator[list[Change | bytes], None]:
        """Pages of changes to send, in order, `limit` + 1 at most in all, or `[RESET]`.
        Raises `DatabaseUnavailable`."""
        feed, name = self.feed, self.feed.name
        if self.journal_positions is not None:
            async for page in self._from_journal(self.journal_positions[: self.limit + 1]):
                yield page
            return
        match = self._match()
        if self.history:
            async with self.store.borrowed() as conn:
                oldest = await changelog.oldest_of_last(
                    conn, name, feed.feed.key, self.history, match
                )
            if oldest is None:
                return  # none yet: every change from now on comes live
            self.after = oldest - 1
        cursor, budget, first = self.after, self.limit + 1, True
        while budget > 0:
            async with self.store.borrowed() as conn:
                found = await changelog.read(
                    conn, name, feed.feed.key, cursor, match, limit=min(PAGE, budget)
                )
            if first and not self.history and found.expired(self.after):
                self.reset = True
                yield [RESET]
                return
            first = False
            if found.changes:
                feed.mark_sent(self.subscriber, [c.position for c in found.changes], self.after)
                yield list(found.changes)
                budget -= len(found.changes)
            if found.done:
                return
            cursor = found.through

    async def _from_journal(
        self, positions: list[int]
    ) -> AsyncGenerator[list[Change | bytes], None]:
        """The changes at `positions` (the journal's order), a page at a time; `[RESET]`
        instead if the log was pruned past the resume's position, or lost one of them."""
        feed = self.feed
        async with self.store.borrowed() as conn:
            pruned = await changelog.pruned_through(conn, feed.name)
        if self.after < pruned:
            self.reset = True
            yield [RESET]
            return
        for start in range(0, len(positions), PAGE):
            wanted = positions[start : start + PAGE]
            async with self.store.borrowed() as conn:
                found = await changelog.at_positions(conn, feed.name, wanted)
            if len(found) < len(wanted):  # pruned meanwhile: the client must refetch
                self.reset = True
                yield [RESET]
                return
            feed.mark_sent(self.subscriber, wanted)
            yield [found[p] for p in wanted]
