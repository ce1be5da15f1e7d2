"""The bus's reading end: every broker's `BusReader`, which routes the stream into its hub.

With `BROKER_BUS_URL` every broker, the relay too, runs a `BusReader` that reads the stream
(`bus.py`) with `XREAD BLOCK` and routes each row into its hub, and each change of a declared
feed through the service's feed registry (`buschanges.py`). So every broker delivers in the
stream's order, and its journal (hence resume by `Last-Event-ID`) is that order too: the reader
preloads the journal from the stream's tail when it starts, so a broker that just started
resumes exactly like one up for hours.

A reader that fell so far behind that the stream was trimmed past its position (a gap) cannot
know what it missed: it ends every stream with an `error` event and forgets its journal, so
clients resume by id from the table (`BusReader._gap`).

A reader whose position is past the stream's last entry (the relay deleted a stream that an
entry with the largest possible id had exhausted, `Bus.exhausted`; the reader finds out when a
read waits in vain) starts again from the stream's start, its journal dropping what it routed
already.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from ..changes import Change
from ..hub import JOURNAL_SIZE, Hub
from ..journal import Journal
from ..signing import RowKey
from ..store import DatabaseUnavailable
from .backoff import Backoff
from .bus import Bus, BusDown, Entry, Pager
from .buschanges import ChangeEntry
from .retry import checkpoint, retry_forever

if TYPE_CHECKING:
    from ..feedset import FeedSet

__all__ = ["GAP", "BusReader", "stream_position"]

GAP = "missed rows on the bus: reconnect to resume"

log = structlog.get_logger(logger_name=__name__)


def stream_position(stream_id: str) -> tuple[int, int]:
    """A stream id as a comparable pair: `10-2` < `9-5` as text, not as ids."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class BusReader:
    """Routes what the stream carries into this broker's hub, in stream order.

    `connected` is what readiness reports with a bus; `last_id` is the last stream id read and
    `lag_ms` how long its entry took from XADD to here.
    """

    def __init__(
        self,
        bus: Bus,
        hub: Hub,
        load_key: Callable[[], Awaitable[RowKey]] | None = None,
        feeds: FeedSet | None = None,
    ) -> None:
        self._bus = bus
        self._hub = hub
        self._feeds = feeds  # where changes go; None: they are dropped
        self._load_key = load_key  # None: the bus's key is set already (`Bus.trust`)
        self.resets = 0  # positions found past the stream's end (`bus_position_reset`)
        self.last_id: str | None = None
        self.high_id: int | None = None  # the highest row id routed
        self.started = asyncio.Event()  # set at the first read, as the listener's first LISTEN
        self.lag_ms = 0.0
        self.connected = False
        self.entries = 0
        self.reconnects = 0
        self.gaps = 0  # times the stream was trimmed past this reader (`_gap`)

    async def run(self) -> None:
        """Read until cancelled, reconnecting with backoff after any Redis failure."""
        await retry_forever(
            self._read,
            self._set_down,
            expected=(BusDown, DatabaseUnavailable),
            crashed="bus_reader_crashed",
            log=log,
        )

    def _set_down(self, exc: BaseException) -> None:
        if self.connected:
            log.warning("bus_down", error=str(exc))
        self.connected = False

    async def _read(self, backoff: Backoff) -> None:
        if self._load_key is not None:
            self._bus.trust(await self._load_key())
        if self.last_id is None:
            await self._preload()
        else:
            await self._bus.ping()
            self.reconnects += 1
        self.connected = True
        self.started.set()
        backoff.reset()
        log.info("bus_up", stream=self._bus.key, last_id=self.last_id, reconnects=self.reconnects)
        pager = Pager()
        while True:
            after = self.last_id or "0-0"
            entries, self.last_id, first_id = await self._bus.read(after, pager=pager)
            if first_id is not None and after != "0-0" and _trimmed(after, first_id):
                self._gap(after, first_id)
            self.route(entries)
            if not entries:
                await self._check_position()
            checkpoint()

    async def _check_position(self) -> None:
        """A read that waited in vain: if the position is past the stream's last entry (the
        stream was deleted and made again, after an entry with the largest possible id), read
        again from its start; the journal drops the rows routed already."""
        if self.last_id in (None, "0-0"):
            return
        top = await self._bus.top()
        if top is None or stream_position(top) < stream_position(self.last_id or "0-0"):
            self.resets += 1
            log.error("bus_position_reset", position=self.last_id, stream_top=top)
            self.last_id = "0-0"

    async def _preload(self) -> None:
        """The journal from the stream's tail, so resume is exact from the first request; read
        a bounded page at a time, keeping only each row's routing keys."""
        rows: list[tuple[int, str, str | None, str]] = []
        last_id: str | None = None
        changes: list[Change] = []
        async for page in self._bus.pages():
            for entry, _ in page:
                last_id = last_id or entry.stream_id
                if isinstance(entry, ChangeEntry):
                    changes.append(entry.change)
                    continue
                message = entry.message
                rows.append((message.id, message.session_id, message.robot_id, message.created_at))
        if self._feeds is not None:
            for change in reversed(changes):
                self._feeds.remember(change)
        journal = self._hub.journal
        for message_id, session_id, robot_id, created_at in reversed(rows):
            if message_id not in journal:
                journal.append(message_id, session_id, robot_id, created_at)
        self.last_id = last_id or "0-0"
        log.info("bus_preloaded", rows=len(rows), last_id=self.last_id)

    def _gap(self, after: str, first_id: str) -> None:
        """The stream was trimmed past this reader's position: rows it never read are gone
        from the bus. They are in the table, so every stream is ended with an `error` event
        and the journal forgotten: each client resumes by id from the table (replay.py), which
        sends the rows it missed. Filling the gap here instead would mean reading an unknown
        number of rows in no known order while streams wait."""
        self.gaps += 1
        log.warning("bus_gap", last_id=after, first_id=first_id, streams=len(self._hub))
        self._hub.journal = Journal(JOURNAL_SIZE)
        if self._feeds is None:
            self._hub.close_all(GAP)
        else:
            self._feeds.forget_changes()
            self._feeds.close_all(GAP)

    def route(self, entries: list[Entry | ChangeEntry]) -> None:
        """Publish each entry's row or change (the hubs drop a copy of one routed already)."""
        publish = self._hub.publish
        for entry in entries:
            if type(entry) is Entry:
                publish(entry.message)
                self.high_id = max(self.high_id or 0, entry.message.id)
            elif self._feeds is not None and isinstance(entry, ChangeEntry):
                self._feeds.route(entry.change)
            self.last_id = entry.stream_id
            self.entries += 1
        if entries:
            self.lag_ms = max(0.0, time.time() * 1000 - entries[-1].added_ms)


def _trimmed(after: str, first_id: str) -> bool:
    """Whether entries after `after` may have been trimmed before this reader got them: the
    stream now starts above `after`. On the safe side: when only the entry at `after` itself
    went, nothing was lost, but that cannot be told apart without a round trip more; a reader
    that keeps up is never there (the newest entry is never trimmed)."""
    return stream_position(first_id) > stream_position(after)
