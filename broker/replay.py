"""What a stream is sent before live: the rows it missed (resume) or the last rows (history).

One mechanism for both, in Mercure's order: the stream is subscribed first, so every row the
hub routes from then on is queued for it; then the rows are read (from the journal's ids or
the table); then `Hub.mark_sent` records what each read sent, before the next await, so a copy
queued meanwhile is dropped and one routed later (a notification in flight, the listener's
backfill after an outage) is skipped: the hub's "nothing twice" rule (`hub.py`). What a
stream may still receive live, case by case:

- Resume from an id N the journal holds: the rows delivered here after N, in delivery
  (commit) order, then live. Exact.
- Resume from an id N the journal does not hold (this process started after N, or its
  listener was down when N committed, or N is older than the journal): every row with an id
  up to N counts as sent, so neither the backfill nor live delivery ever sends one; rows above
  N come once each, by id from the table, then live. A row with an id below N that commits
  after the client's resume is not sent (the README's ordering window).
- `history=H`: the last H rows that match, oldest first, then live; it is a resume from just
  before the oldest of them, so an older row is never sent after them.

Nothing is read before the listener's first LISTEN (`Listener.started`): a row committed
between a read and that LISTEN would be neither read nor notified.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from .events import Message, encode_message
from .hub import Hub, Subscriber
from .store import Store

__all__ = ["REPLAY_PAGE", "REPLAY_PAGE_BYTES", "Replay"]

REPLAY_PAGE = 500  # rows read at a time, at most
REPLAY_PAGE_BYTES = 1024 * 1024  # and about this many bytes (one row at least)


@dataclass
class Replay:
    """The rows one new stream is sent before live, read page by page."""

    hub: Hub
    store: Store
    subscriber: Subscriber
    limit: int
    after: int = 0  # resume by id after this row (and count every row up to it as seen)
    journal_ids: list[int] | None = None  # resume from the journal: these rows, in this order
    history: int = 0  # the last `history` rows first

    @staticmethod
    def encode(item: Message) -> bytes:
        """The event a replayed row is sent as (`web/stream.py`'s `Backlog`)."""
        return encode_message(item)

    @classmethod
    def plan(
        cls,
        hub: Hub,
        store: Store,
        subscriber: Subscriber,
        *,
        last_event_id: int | None,
        history: int | None,
        limit: int,
    ) -> Replay | None:
        """The replay of a stream that has just subscribed, or None for live only. Call it in
        the same event-loop step as `Hub.subscribe`: the journal's answer is exact only then.
        `history` is ignored with a `last_event_id`."""
        if last_event_id is None:
            return None if history is None else cls(hub, store, subscriber, limit, history=history)
        journal_ids = hub.journal.after(last_event_id, subscriber.filter)
        if journal_ids is None:
            hub.mark_sent(subscriber, (), floor=last_event_id)  # at once: a backfill may run
        return cls(hub, store, subscriber, limit, last_event_id, journal_ids)

    async def pages(self) -> AsyncGenerator[list[Message], None]:
        """Pages of rows to send, in order, `limit` + 1 rows at most in all (one more than the
        limit tells the caller the limit was reached), each of `REPLAY_PAGE` rows and about
        `REPLAY_PAGE_BYTES` at most. Raises `DatabaseUnavailable`."""
        rows = self.subscriber.filter
        if self.journal_ids is not None:
            # The journal chose the ids; the table, as it stands, says which still match.
            ids = self.journal_ids[: self.limit + 1]
            while ids:
                wanted = ids[:REPLAY_PAGE]
                page = await self.store.in_order(wanted, REPLAY_PAGE_BYTES, rows)
                self.hub.mark_sent(self.subscriber, [row.id for row in page])
                yield page
                ids = ids[wanted.index(page[-1].id) + 1 if page else len(wanted) :]
            return
        if self.history:
            # A resume from just before the oldest of the last `history` rows.
            oldest = await self.store.oldest_of_last(self.history, rows)
            if oldest is None:
                return  # none yet: every row from now on comes live
            self.after = oldest - 1
        cursor, budget = self.after, self.limit + 1
        while budget > 0:
            want = min(REPLAY_PAGE, budget)
            page = await self.store.after(cursor, want, rows, REPLAY_PAGE_BYTES)
            if not page:  # a short page may only have been cut at its size: ask again
                return
            self.hub.mark_sent(self.subscriber, [row.id for row in page], self.after)
            yield page
            budget -= len(page)
            cursor = page[-1].id
