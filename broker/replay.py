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

Updates and deletes of messages (`changes`: only when the feeds file declares them for the
messages feed; without, the change log is never read): their positions share the row ids'
sequence, so every case above holds for them, each read from the log, not the table:

- From the journal: its ids are rows or change positions (`Journal.is_change`), sent in
  journal order, rows read from the table, changes from the log by position.
- By position: rows with id > N and changes with position > N that the filter takes (an
  update on its row after or before it, a delete on its row before), merged in position
  order, page by page. When the log was pruned past N (`changelog.pruned_through`), the
  client missed changes no one can send: it gets `reset` instead, then live, and refetches.
- History: the last H rows (as they stand now), then every row and change after the oldest
  of them. No `reset` there: the rows read are current, whatever was pruned.

Rows are always read as they stand (the table is their log): a row edited since is sent with
its edit, then the edit itself (the same content twice, harmless); a row deleted before the
read is not sent, only its `message_deleted` (inserts of messages are not logged, so nothing
holds the deleted row any more; a client holding no such message ignores it).

Nothing is read before the listener's first LISTEN (`Listener.started`): a row committed
between a read and that LISTEN would be neither read nor notified.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import structlog

from .changes import Change
from .events import (
    Message,
    encode_message,
    encode_message_deleted,
    encode_message_updated,
    encode_reset,
    message_of_change,
)
from .hub import Hub, Subscriber
from .store import ROW_OVERHEAD_BYTES, Store

__all__ = ["REPLAY_PAGE", "REPLAY_PAGE_BYTES", "RESET", "Item", "Replay", "Reset"]

REPLAY_PAGE = 500  # rows read at a time, at most
REPLAY_PAGE_BYTES = 1024 * 1024  # and about this many bytes (one row at least)

log = structlog.get_logger(logger_name=__name__)


@dataclass(frozen=True, slots=True)
class Reset:
    """The item sent instead of a replay whose changes were pruned: `reset`, then live."""


RESET = Reset()
Item = Message | Change | Reset


def position(item: Message | Change) -> int:
    return item.id if isinstance(item, Message) else item.position


def within_bytes(items: list[Message | Change]) -> list[Message | Change]:
    """The first of `items` that fit in about `REPLAY_PAGE_BYTES` (one at least), sized as
    `Store` sizes rows: content plus `ROW_OVERHEAD_BYTES`. Rows come cut to the page budget
    already; changes are read whole from the log, so a page of large edits is cut here."""
    total = 0
    for count, item in enumerate(items):
        content = item.content if isinstance(item, Message) else item.data.get("content")
        total += ROW_OVERHEAD_BYTES + (len(content) if isinstance(content, str) else 0)
        if total > REPLAY_PAGE_BYTES and count:
            return items[:count]
    return items


@dataclass
class Replay:
    """The rows (and changes) one new stream is sent before live, read page by page."""

    hub: Hub
    store: Store
    subscriber: Subscriber
    limit: int
    after: int = 0  # resume by id after this row (and count every row up to it as seen)
    journal_ids: list[int] | None = None  # resume from the journal: these rows, in this order
    history: int = 0  # the last `history` rows first
    changes: bool = False  # the messages feed logs its updates and deletes: merge them in
    journal_changes: frozenset[int] = frozenset()  # which `journal_ids` are changes

    def encode(self, item: Item) -> bytes:
        """The event an item is sent as (`web/stream.py`'s `Backlog`): a row as `message`, a
        change as `message_updated` or `message_deleted`, a `Reset` as `reset`. A logged
        change that is not a messages row is logged and sent as nothing."""
        if isinstance(item, Message):
            return encode_message(item)
        if isinstance(item, Reset):
            return encode_reset()
        try:
            if item.op == "update":
                return encode_message_updated(item, max_bytes=self.store.max_row_bytes)
            if item.op == "delete":
                return encode_message_deleted(item)
            return encode_message(message_of_change(item.data, self.store.max_row_bytes))
        except ValueError as exc:
            log.error("change_not_replayed", position=item.position, error=str(exc))
            return b""

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
        changes: bool = False,
    ) -> Replay | None:
        """The replay of a stream that has just subscribed, or None for live only. Call it in
        the same event-loop step as `Hub.subscribe`: the journal's answer is exact only then.
        `history` is ignored with a `last_event_id`. `changes`: the messages feed declares
        updates or deletes (its changes are in the log)."""
        if last_event_id is None:
            if history is None:
                return None
            return cls(hub, store, subscriber, limit, history=history, changes=changes)
        journal = hub.journal
        journal_ids = journal.after(last_event_id, subscriber.filter)
        if journal_ids is None:
            hub.mark_sent(subscriber, (), floor=last_event_id)  # at once: a backfill may run
        replay = cls(hub, store, subscriber, limit, last_event_id, journal_ids, changes=changes)
        if changes and journal_ids:
            replay.journal_changes = frozenset(i for i in journal_ids if journal.is_change(i))
        return replay

    async def pages(self) -> AsyncGenerator[list[Item], None]:
        """Pages of rows to send, in order, `limit` + 1 rows at most in all (one more than the
        limit tells the caller the limit was reached), each of `REPLAY_PAGE` rows and about
        `REPLAY_PAGE_BYTES` at most. Raises `DatabaseUnavailable`."""
        if self.journal_ids is not None:
            pages = self._from_journal(self.journal_ids[: self.limit + 1])
        else:
            if self.history:
                # A resume from just before the oldest of the last `history` rows.
                oldest = await self.store.oldest_of_last(self.history, self.subscriber.filter)
                if oldest is None:
                    return  # none yet: every row from now on comes live
                self.after = oldest - 1
            pages = self._merged() if self.changes else self._by_id()
        async for page in pages:
            yield page

    async def _from_journal(self, ids: list[int]) -> AsyncGenerator[list[Item], None]:
        """The journal chose the ids; the table, as it stands, says which rows still match
        (a change is sent as logged: it is what was delivered)."""
        rows, changed = self.subscriber.filter, self.journal_changes
        while ids:
            wanted = ids[:REPLAY_PAGE]
            row_ids = [i for i in wanted if i not in changed] if changed else wanted
            table: list[Message] = []
            if row_ids:
                table = await self.store.in_order(row_ids, REPLAY_PAGE_BYTES, rows)
            # Read through the last row sent; past it only if every row wanted was read (a
            # page cut at its byte budget goes on after its last row).
            through = len(wanted)
            if table and table[-1].id != row_ids[-1]:
                through = wanted.index(table[-1].id) + 1
            page: list[Message | Change] = list(table)
            positions = [i for i in wanted[:through] if i in changed]
            if positions:
                found = await self.store.changes_at(positions)
                if len(found) < len(positions):  # pruned: the client must refetch
                    yield [RESET]
                    return
                by_position: dict[int, Message | Change] = {row.id: row for row in table}
                by_position.update(found)
                whole = [by_position[i] for i in wanted[:through] if i in by_position]
                page = within_bytes(whole)
                if len(page) < len(whole):  # large edits: the rest is the next page's
                    through = wanted.index(position(page[-1])) + 1
            self.hub.mark_sent(self.subscriber, [position(item) for item in page])
            yield list(page)
            ids = ids[through:]

    async def _by_id(self) -> AsyncGenerator[list[Item], None]:
        """Rows with id > `after`, from the table, in id order."""
        rows = self.subscriber.filter
        cursor, budget = self.after, self.limit + 1
        while budget > 0:
            want = min(REPLAY_PAGE, budget)
            page = await self.store.after(cursor, want, rows, REPLAY_PAGE_BYTES)
            if not page:  # a short page may only have been cut at its size: ask again
                return
            self.hub.mark_sent(self.subscriber, [row.id for row in page], self.after)
            yield list(page)
            budget -= len(page)
            cursor = page[-1].id

    async def _merged(self) -> AsyncGenerator[list[Item], None]:
        """Rows with id > `after` and logged changes with position > `after`, merged in
        position order. Each page is sent only as far as both reads are known complete: up
        to the last row read (a page of rows may be cut at its byte budget) and, while the
        log has more, the position it was read through."""
        rows = self.subscriber.filter
        cursor, budget = self.after, self.limit + 1
        first = True
        while budget > 0:
            want = min(REPLAY_PAGE, budget)
            table = await self.store.after(cursor, want, rows, REPLAY_PAGE_BYTES)
            logged = await self.store.changes_after(cursor, want, rows)
            if first and not self.history and logged.expired(self.after):
                yield [RESET]  # changes after the client's position were pruned
                return
            first = False
            bound = table[-1].id if table else None
            if not logged.done:
                bound = logged.through if bound is None else min(bound, logged.through)
            merged: list[Message | Change] = sorted([*table, *logged.changes], key=position)
            if bound is not None:
                merged = [item for item in merged if position(item) <= bound]
            page = within_bytes(merged[:want])
            if len(page) < len(merged):
                merged = page
                bound = position(merged[-1])
            if merged:
                self.hub.mark_sent(self.subscriber, [position(i) for i in merged], self.after)
                yield list(merged)
                budget -= len(merged)
            if bound is None:
                return  # both read to their end
            cursor = bound
