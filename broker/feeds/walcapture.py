"""`BROKER_CAPTURE=wal` in the feed core: the one reader of a database's capture slot.

A `Source` (the listener, or with a bus the relay) takes its items from a `SlotStream`
(`walstream.py`) instead of LISTEN: the messages table's inserts as rows decoded from the WAL
(no trigger, nothing to verify) and the feeds' changes as signed payloads; everything after
that (verify, parse, emit, references, backfill) is the same code (`source.Source.serve`).
What is the slot's own:

- **One reader per database.** A session advisory lock keyed by the slot's name
  (`SLOT_LOCK_CLASS`, `hashtext(slot)`), held on the source's own connection, says who reads.
  Without a bus the broker that takes it reads and every other is not ready and asks again
  every `CAMPAIGN_SECONDS` (so the mode without a bus is one broker process; more need the
  bus). With a bus the relay takes it after its own election. The slot's `active_pid` alone
  cannot elect: a reader killed with -9 leaves its walsender until PostgreSQL notices.
- **Takeover.** The lock's holder that finds the slot busy knows that reader is stale (it
  lost the lock): it ends that walsender if its `application_name` is `READER_NAME`
  (`pg_terminate_backend`: the same role, or `pg_signal_backend`), and starts again within
  `BUSY_RETRY_SECONDS`. Another session's short use (a `slot_lag` peek) is waited out.
- **Confirming.** The slot moves only after the batch was handed on (`SlotTransport.confirm`
  runs the source's `before_confirm` first: the relay waits for Redis), so a reader killed
  before that loses nothing; what the slot gives again after a restart is dropped by the
  hub's journal (listener) or by the bus's readers (relay).
- **Visible first.** The walsender sends a transaction once its commit record is flushed,
  a moment before other sessions can see it; a batch is handed on only once its
  transactions are visible (`SlotTransport.next`), so a resume reading the journal's ids from
  the table, or a large row's reference, finds them.
- **An invalidated slot** (`max_slot_wal_keep_size` exceeded): one `capture_slot_invalidated`
  error line, the source is not ready meanwhile, the slot is dropped and made again, and
  `recreated` tells the source to backfill from the tables what committed meanwhile.

`CaptureMonitor` samples the slot's lag (`wal.slot_lag`) every `MONITOR_SECONDS` on a
connection of its own, for stats, `/metrics` and readiness; every `MONITOR_WAITING_SECONDS`
while no reader holds the slot, since a follower's readiness waits for the sample that sees
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import errors

from ..errors import BrokerError
from ..slots import PLUGIN, PREFIX, SlotBusy, SlotInvalidated
from ..store import DEFAULT_MAX_ROW_BYTES
from .backoff import Backoff
from .capture import CHANNEL as CHANGES_PREFIX
from .retry import pause
from .source import RECONNECT_MAX_SECONDS
from .wal import Item, SlotLag, slot_lag
from .walstream import SlotStream

__all__ = [
    "PREFIXES",
    "READER_NAME",
    "CaptureMonitor",
    "SlotClaim",
    "SlotTransport",
]

READER_NAME = "pgsse-capture"  # the stream's walsender in pg_stat_activity
MONITOR_NAME = "pgsse-capture-monitor"
# The feeds' logical messages, and the messages' from a trigger an older migration left
PREFIXES = (PREFIX, CHANGES_PREFIX)
SLOT_LOCK_CLASS = 0x7077  # the advisory lock's first key ('pw'); the second is hashtext(slot)
CAMPAIGN_SECONDS = 1.0
BUSY_RETRY_SECONDS = 0.2
RELEASE_POLL_SECONDS = 0.02  # an invalidated slot's drop, asked again (`SlotClaim._drop`)
RELEASE_TIMEOUT_SECONDS = 5.0
MONITOR_SECONDS = 1.0
MONITOR_WAITING_SECONDS = 0.1  # the sampling period while no reader holds the slot
VISIBLE_WAIT_SECONDS = 1.0  # a batch's transactions not visible yet: asked again this long
VISIBLE_FIRST_RETRY_SECONDS = 0.001
# Batches (each one visibility query) handed out at least this far apart: what arrives
# meanwhile waits and joins the next batch (docs/capture.md, "Where the WAL gap goes").
BATCH_INTERVAL_SECONDS = 0.005

Fetched = TypeVar("Fetched")

log = structlog.get_logger(logger_name=__name__)

Connection = psycopg.AsyncConnection[Any]


class SlotTransport:
    """What `Source.serve` reads in wal mode: the stream's batches, confirmed once handed on
    (the same `next`/`read`/`confirm` as `Notifications`)."""

    def __init__(
        self,
        stream: SlotStream,
        conn: Connection,
        before_confirm: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self._before_confirm = before_confirm
        self._last_batch = -BATCH_INTERVAL_SECONDS  # loop time the last batch was handed out

    async def next(self) -> list[Item]:
        """The next batch, once its transactions are visible to other sessions.

        The walsender sends a transaction once its commit record is flushed; PostgreSQL ends
        it in its process array (what a snapshot sees) a moment later. A row routed before
        that could be in a hub's journal and not yet in the table: a resume at that moment
        (the journal's ids, read by id) missed it, once in the wal soak's 36,001 rows, and a
        large row's reference found nothing (134 of them before this). NOTIFY is sent after
        that point. So: one query per batch, on the source's connection, asked again while a
        transaction of the batch is still in progress in a fresh snapshot.

        Batches are handed out at least `BATCH_INTERVAL_SECONDS` apart: under load the stream
        gives a batch for every few commits, and a query each cost the writers 12-18% of their
        rate in the bench, more than the query's own CPU (a backend woken on the database's
        CPU, a snapshot taken against their commits). Waiting up to 5 ms gathers what arrives
        meanwhile into one batch, one query: 16 writers 6,718 -> 7,979 rows/s (means of four
        mirrored runs each), as many as with no query at all; 32 writers +2.5% (noise), the
        queries' backend down from 6% of the database's CPU to 2%. The price is up to 5 ms
        more delivery latency under load (p50 at 500 rows/s 0.5 -> 3.3 ms); a transaction
        after a pause is not delayed."""
        loop = asyncio.get_running_loop()
        wait = self._last_batch + BATCH_INTERVAL_SECONDS - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        batch = await self._stream.next()
        xids = self._stream.xids
        delay = VISIBLE_FIRST_RETRY_SECONDS
        waited = 0.0
        while await self.in_progress(xids) and waited < VISIBLE_WAIT_SECONDS:
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.1)
        self._last_batch = loop.time()
        return batch

    async def in_progress(self, xids: list[int]) -> bool:
        """Whether a transaction of `xids` (32-bit ids, as pgoutput gives them) is still in
        progress in a snapshot taken now."""
        row = await (
            await self._conn.execute(
                # In progress: in the snapshot's list, or at or past its xmax (32-bit ids,
                # compared modulo 2^32 as PostgreSQL does).
                "SELECT EXISTS (SELECT FROM pg_snapshot_xip(s) AS x"
                "   WHERE x::text::bigint %% 4294967296 = ANY(%(xids)s::bigint[]))"
                " OR EXISTS (SELECT FROM unnest(%(xids)s::bigint[]) AS t(xid)"
                "   WHERE (t.xid - pg_snapshot_xmax(s)::text::bigint %% 4294967296"
                "     + 4294967296) %% 4294967296 < 2147483648)"
                " FROM pg_current_snapshot() AS s",
                {"xids": xids},
            )
        ).fetchone()
        return bool(row and row[0])

    async def read(self, fetch: Callable[[], Awaitable[Fetched | None]]) -> Fetched | None:
        """Run `fetch`, a query for a row or change of a payload just received (`next()`
        made its transaction visible first)."""
        return await fetch()

    @property
    def position(self) -> int | None:
        """The WAL position `confirm` moves the slot to (the last batch's end), None when
        there is nothing to confirm."""
        return self._stream.position

    @property
    def idle_end(self) -> int:
        """Where the slot may go while idle: every transaction of ours before it was handed
        on and confirmed (`SlotStream.idle_end`)."""
        return self._stream.idle_end

    def release(self, lsn: int) -> None:
        """Let idle advances go up to `lsn` (`read(held=True)`)."""
        limit = self._stream.idle_limit
        if limit is not None and lsn > limit:
            self._stream.idle_limit = lsn

    async def confirm(self) -> None:
        if self._before_confirm is not None:
            await self._before_confirm()
        await self._stream.confirm()

    def lag_seconds(self) -> float:
        """Seconds since the oldest transaction not yet confirmed committed; 0 when none."""
        since = self._stream.unconfirmed_since()
        if since is None:
            return 0.0
        return max(0.0, (datetime.datetime.now(datetime.UTC) - since).total_seconds())


class SlotClaim:
    """This process's claim on the capture slot `slot` (the module docstring).

    `reading` is the transport while this process reads the slot, None otherwise;
    `recreated` says that the last `reading()` had to make the slot again (backfill);
    `invalidations` and `takeovers` are counters for stats."""

    def __init__(self, url: str, slot: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> None:
        self._url = url
        self.slot = slot
        self._max_row_bytes = max_row_bytes
        self.reading: SlotTransport | None = None
        self.recreated = False
        self.invalidations = 0
        self.takeovers = 0
        self._refused = False

    async def campaign(self, conn: Connection) -> None:
        """Wait until `conn`'s session holds the slot's lock (asking every
        `CAMPAIGN_SECONDS`); also a health check of `conn` each time."""
        logged = False
        while True:
            row = await (
                await conn.execute(
                    "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (SLOT_LOCK_CLASS, self.slot)
                )
            ).fetchone()
            if row and row[0]:
                return
            if not logged:
                log.info("capture_reader_elsewhere", slot=self.slot, retry_seconds=CAMPAIGN_SECONDS)
                logged = True
            await pause(CAMPAIGN_SECONDS)

    async def confirmed(self, conn: Connection) -> int | None:
        """The slot's confirmed position (`confirmed_flush_lsn`): the reader starts after it.
        None when there is no such slot."""
        row = await (
            await conn.execute(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots"
                " WHERE slot_name = %s AND database = current_database()",
                (self.slot,),
            )
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @asynccontextmanager
    async def read(
        self,
        conn: Connection,
        before_confirm: Callable[[], Awaitable[None]] | None = None,
        held: bool = False,
    ) -> AsyncIterator[SlotTransport]:
        """Stream the slot, `conn`'s session holding the lock (`campaign`): a stale reader is
        ended, an invalidated slot made again (`recreated`). `held`: the slot moves only by
        `confirm`, and while idle up to what `SlotTransport.release` allows."""
        self.recreated = False
        stream = await self._start(conn, held)
        try:
            self.reading = SlotTransport(stream, conn, before_confirm)
            yield self.reading
        finally:
            self.reading = None
            await stream.__aexit__(None, None, None)

    async def _start(self, conn: Connection, held: bool) -> SlotStream:
        busy_logged = False
        while True:
            stream = SlotStream(
                self._url,
                self.slot,
                prefixes=PREFIXES,
                application_name=READER_NAME,
                max_row_bytes=self._max_row_bytes,
                idle_limit=0 if held else None,
            )
            try:
                return await stream.__aenter__()
            except SlotBusy as exc:
                if not await self._end_stale(conn) and not busy_logged:
                    log.warning("capture_slot_busy", slot=self.slot, error=str(exc))
                    busy_logged = True
            except SlotInvalidated as exc:
                self.invalidations += 1
                log.error(
                    "capture_slot_invalidated", slot=self.slot, action="recreated", error=str(exc)
                )
                await self._recreate(conn)
                self.recreated = True
                continue
            await pause(BUSY_RETRY_SECONDS)

    async def _end_stale(self, conn: Connection) -> bool:
        """End the slot's walsender if it is a pgsse reader (this session holds the lock, so
        it is stale); True when one was ended."""
        try:
            rows = await (
                await conn.execute(
                    "SELECT a.pid, pg_terminate_backend(a.pid) FROM pg_replication_slots s"
                    " JOIN pg_stat_activity a ON a.pid = s.active_pid"
                    " WHERE s.slot_name = %s AND a.application_name = %s",
                    (self.slot, READER_NAME),
                )
            ).fetchall()
        except errors.InsufficientPrivilege as exc:
            if not self._refused:
                log.error("capture_takeover_refused", slot=self.slot, error=str(exc).strip())
                self._refused = True
            return False
        ended = [pid for pid, done in rows if done]
        for pid in ended:
            self.takeovers += 1
            log.warning("capture_reader_stale_terminated", backend_pid=pid, slot=self.slot)
        return bool(ended)

    async def _recreate(self, conn: Connection) -> None:
        """Drop the invalidated slot and make it again: it starts now, and the source reads
        what committed before from the tables."""
        # Dropped meanwhile (`pgsse migrate --drop-capture`), or made again by a migrating
        # instance after the drop (then as new as ours): either is fine.
        await self._drop(conn)
        with contextlib.suppress(errors.DuplicateObject):
            await conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, %s)", (self.slot, PLUGIN)
            )
        log.info("capture_slot_created", slot=self.slot)

    async def _drop(self, conn: Connection) -> None:
        """Drop the slot once its last reader let go of it. A walsender whose
        START_REPLICATION failed on the invalidated slot sends the error before it releases
        the slot (PostgreSQL's error recovery reports first, cleans up after), so a drop
        right after that error can find the slot active for a moment: asked again every
        `RELEASE_POLL_SECONDS`, within `RELEASE_TIMEOUT_SECONDS` (then the source's retry)."""
        deadline = asyncio.get_running_loop().time() + RELEASE_TIMEOUT_SECONDS
        while True:
            try:
                await conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                return
            except errors.UndefinedObject:
                return
            except errors.ObjectInUse:
                if asyncio.get_running_loop().time() > deadline:
                    raise
            await pause(RELEASE_POLL_SECONDS)


class CaptureMonitor:
    """The slot's lag, sampled every `MONITOR_SECONDS` (stats, `/metrics`, readiness).

    `lag` is the last sample (None before the first, or while the database is away), `error`
    why the last one failed (a missing slot, say)."""

    def __init__(self, url: str, slot: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> None:
        self._url = url
        self.slot = slot
        self._max_row_bytes = max_row_bytes
        self.lag: SlotLag | None = None
        self.error: str | None = None

    async def run(self) -> None:
        """Sample until cancelled; a failure is recorded and the connection made again, with
        the source's backoff.

        While no reader holds the slot (an outage, a takeover) it samples every
        `MONITOR_WAITING_SECONDS`, not every second: a follower is ready again only once a
        sample sees the new reader, and with a one-second period (and a second's pause after
        a failure) that took up to two seconds after the relay's return (the wal soak
        measured 1.05 s from PostgreSQL's return to every broker ready). The cost: ten
        queries a second per follower, only while the slot is unread."""
        backoff = Backoff(maximum=RECONNECT_MAX_SECONDS)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, application_name=MONITOR_NAME, connect_timeout=5
                ) as conn:
                    while True:
                        self.lag = await slot_lag(conn, self.slot)
                        self.error = None
                        backoff.reset()
                        waiting = not self.reader_active
                        await asyncio.sleep(MONITOR_WAITING_SECONDS if waiting else MONITOR_SECONDS)
            except (psycopg.Error, OSError, BrokerError) as exc:  # SlotMissing is one
                self.lag = None
                self.error = " ".join(str(exc).split())
            await asyncio.sleep(backoff.next())

    @property
    def reader_active(self) -> bool:
        """Whether a session read the slot at the last sample."""
        return self.lag is not None and self.lag.active_pid is not None
