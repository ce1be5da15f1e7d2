"""The listener: the one LISTENing PostgreSQL connection of this process, feeding its hub.

A thin end of `source.Source`, which owns the connection, its recovery, the backfill and the
notifications. What is the listener's own: the floor of its backfill, and when streams may
start reading. Rows go to the hub; changes of declared feeds to `route_change` (the service's
`FeedSet.route`). Changes recover as rows do: the first connection records each captured
feed's last position as its floor, and each reconnect backfills from the change log every
change above it that the feed's journal does not hold.

`started` is set at the first LISTEN: streams wait for it before they read anything, so no
row can commit between a stream's read of the table and the first LISTEN unseen. The first
connection records the table's last id as the floor; each reconnect backfills, against the
hub's journal, every row above it that the journal does not hold, down to the journal's
horizon (rows committed during the outage reach their subscribers once, in order); the hub
drops the overlap between the backfill and the notifications of rows committed while it ran.

With a `SlotClaim` (`BROKER_CAPTURE=wal` without a bus) the listener reads the capture slot
instead of LISTENing (`walcapture.py`): it campaigns for the slot's lock first (not connected,
so not ready, meanwhile), and a reconnect needs no backfill, since the slot kept every payload
not confirmed, in commit order; only a slot made again (it was invalidated) is backfilled
from the table, as after a LISTEN outage. What the slot gives again (handed on, not yet
confirmed when the connection died) the hub's journal drops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from ..changes import Change
from ..events import Message
from ..hub import Hub
from ..store import Store
from . import changelog
from .backoff import Backoff
from .source import (
    APPLICATION_NAME,
    CHANNEL,
    ChangesHeld,
    Connection,
    Source,
    dedicated_connection,
)
from .walcapture import SlotClaim

__all__ = ["APPLICATION_NAME", "CHANNEL", "Listener"]

log = structlog.get_logger(logger_name=__name__)


class Listener(Source):
    """Feeds the hub from PostgreSQL. `connected` is what `/readyz` reports."""

    name = "listener"
    down_event = "listener_down"
    failed_event = "listener_connect_failed"

    def __init__(
        self,
        url: str,
        hub: Hub,
        store: Store,
        route_change: Callable[[Change], object] | None = None,
        changes: ChangesHeld | None = None,
        captured: Sequence[str] = (),
        claim: SlotClaim | None = None,
    ) -> None:
        super().__init__(url, store)
        self._hub = hub
        self._route_change = route_change or hub.publish_change
        self._changes = changes  # what the hubs hold of the `captured` feeds' changes
        self._captured = tuple(captured)
        self._change_floors: dict[str, int] | None = None  # per feed, as `_floor` for rows
        self.claim = claim  # the capture slot to read instead of LISTEN (`BROKER_CAPTURE=wal`)
        self._floor: int | None = None  # rows up to this id committed before the first LISTEN
        self.started = asyncio.Event()
        self.reconnects = 0

    async def attempt(self, backoff: Backoff) -> None:
        if self.claim is not None:
            await self._read_slot(self.claim, backoff)
            return
        async with await dedicated_connection(self._url, APPLICATION_NAME) as conn:
            rows = await self.listen(conn)
            await self._catch_up(conn, rows, backfill=True)
            self.connected = True
            self.started.set()
            backoff.reset()
            log.info("listener_up", channel=CHANNEL, floor=self._floor, reconnects=self.reconnects)
            await self.serve(conn, rows)

    async def _read_slot(self, claim: SlotClaim, backoff: Backoff) -> None:
        """The wal mode's connection life: the slot's lock, then its stream."""
        async with await dedicated_connection(self._url, APPLICATION_NAME) as conn:
            rows = await self.listen(conn, notify=False)
            await claim.campaign(conn)
            async with claim.read(conn) as transport:
                await self._catch_up(conn, rows, backfill=claim.recreated)
                self.connected = True
                self.started.set()
                backoff.reset()
                log.info(
                    "listener_up", slot=claim.slot, floor=self._floor, reconnects=self.reconnects
                )
                await self.serve(conn, rows, transport)

    async def _catch_up(self, conn: Connection, rows: Store, backfill: bool) -> None:
        """The first connection records the floors (rows, each feed's changes); a later one
        backfills rows and changes committed meanwhile, or with `backfill` False (the slot
        kept them) only revives the pool."""
        if self._floor is None:
            self._floor = await rows.last_id()
        else:
            self.reconnects += 1
            if backfill:
                await self.backfill(rows, self._backfill_floor(), self._hub.journal)
            else:
                self._store.revive()
        if self._captured and self._changes is not None:
            if self._change_floors is None:
                self._change_floors = await changelog.last_positions(conn, self._captured)
            elif backfill:
                await self.backfill_changes(conn, self._change_floors, self._changes)

    def _backfill_floor(self) -> int:
        """Where the backfill looks from: the first LISTEN's floor (lowered to an id found
        reused, whose rows are new), or the journal's horizon if that is higher."""
        if self._hub.reused_from is not None:  # ids were reused: look again from there
            self._floor = min(self._floor or 0, self._hub.reused_from - 1)
            self._hub.reused_from = None
        return max(self._floor or 0, self._hub.journal.forgotten_up_to)

    def emit(self, message: Message, signed: str | None) -> None:
        self._hub.publish(message)

    async def emit_page(self, messages: list[Message]) -> None:
        publish = self._hub.publish
        for message in messages:
            publish(message)

    def emit_change(self, change: Change, signed: str | None) -> None:
        self._route_change(change)
