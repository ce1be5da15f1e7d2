"""The relay role: of all brokers on one bus, exactly one LISTENs and appends rows to it.

Every broker with a bus runs a `Relay`, which campaigns on its own PostgreSQL connection for a
session advisory lock keyed by the stream. The holder LISTENs on that same connection, so the
database holds one listening backend whatever the number of brokers, and losing the
connection loses both the lock and the LISTEN at once: kill -9, a terminated backend or a
network cut hand the role to the next broker to ask (every `CAMPAIGN_SECONDS`). A relay that
cannot append to Redis closes its connection too, giving the role up.

On taking the role the relay backfills: every row above the bus's floor (the table's last id
when the stream's first relay LISTENed, kept in Redis) that the stream's tail lacks (rows
committed while no relay was up, in any id order, or appended by no one since Redis lost them)
is appended once, in id order, before the notifications that queued meanwhile; those the
backfill already appended are skipped. Rows go to Redis through an `Appender`: one pipeline
per batch of rows that queued during the previous round trip, in order; a failed append cuts
the relay's own connection, so the role passes on exactly as if it had died.

The lock's key is the stream's key and the bus's identity (`Bus.identity`, kept in Redis): two
deployments on one database with the same stream key on different Redis servers each elect
their own relay.

A live relay proves it: it holds a lease in Redis (`Bus.lease_key`, `LEASE_MS`) that it renews
every `RENEW_SECONDS`, on a Redis connection of its own while the role lasts (`Bus.lease`). A relay
that stops (SIGSTOP, a paused VM, a blocked event loop) keeps its PostgreSQL session, hence the
lock, but not the lease: every broker sees the lease gone at its next campaign poll and reports not
ready (`lease_live`), asks again every `CAMPAIGN_WAITING_SECONDS` (a relay elected a moment ago
takes its lease within a round trip: followers are ready again at once), and once the lease has
stayed gone for `TAKEOVER_GRACE_SECONDS`, terminates the holder's backend
(`pg_terminate_backend`, allowed for a backend of the same database role) so the lock passes on
and the pool delivers again. Without the privilege (the relay's backend runs as another role),
brokers stay not ready until the relay resumes or dies: `takeover_refused` says so.
A frozen relay that wakes finds its lease taken (renewal is conditional) and its connection gone,
and steps down; rows it had queued are in the table, appended by the new relay's backfill too, and
readers drop the second copy.

The relay is a thin end of `source.Source`, which owns the LISTEN, the backfill and the
notifications, on the relay's own connection (never through the store's pool, which it revives
once its backfill is done). What is the relay's own: the campaign and its lease, the floor of
its backfill against the bus, and appending.

With a `SlotClaim` (`BROKER_CAPTURE=wal`) the relay is the capture slot's one reader: once
elected it takes the slot's lock too (`walcapture.py`) and reads the slot instead of
LISTENing. A batch from the slot is confirmed only once Redis took it (`Appender.drained`),
so a relay that dies loses nothing of the slot; what the next relay reads again, the bus's
readers drop as a second copy.

In wal mode a takeover needs no backfill when the slot and the stream are intact, and takes
none: it neither scans the table nor reads the stream's entries (that read, ~40 MB in the wal
soak, held every client for 0.5-4 s after each fault). What tells "intact" is the WAL mark
(`Bus.set_wal_mark`): a position through which the stream holds every transaction of the
slot's, written on the appends' connection after the rows it covers (`Appender.mark`): before
each batch is confirmed (its end), after a backfill (the slot's position when it started),
and while idle (`_mark_idle`: where the slot's keepalives would move it, none of ours before
it). The slot is held to the mark (`read(held=True)`: its idle advances stop at the last mark
Redis took), so it is never past the mark unless something else moved it. A relay taking over
skips the backfill when the slot was not made again, the mark is there, the slot's confirmed
position is at or below it, and the stream is not empty (nor exhausted). Exact, because every
transaction committed at or below the slot's position is then in the stream (or trimmed from
it: readers that had not read it got a gap), and every one after it the slot gives again,
rows and the feeds' changes alike (logical messages in the same transactions). Every other
case scans, and deletes the mark first, so a relay that dies mid-backfill leaves none: the
first relay ever (no mark); Redis restarted empty or lost the stream (no mark, or an empty
stream; a restore from a snapshot holds an older mark, which the slot is past); an exhausted
stream (deleted); a slot made again after invalidation or by hand (it starts past the mark,
or `recreated`); a slot consumed meanwhile by another reader (a broker without the bus: past
the mark); notify mode (no slot: rows commit while no one listens). A mark is written only
while the writer holds the relay's lease (checked in Redis with the write, `Bus.set_wal_mark`'s
`holder`): a relay frozen past its lease that wakes mid-drain cannot set one during a new
relay's backfill, which a third relay would then trust; refused, it steps down. The byte
budget needs the sizes of the stream's entries: they are read in Redis (`Bus.sizes_through`,
ids and sizes only) while the relay appends, and put under its own (`Sizes.add_older`); until
then the stream may pass its budget by what it held. The feeds' floors on the bus are set as a
backfill sets them.

What the relay appends is signed with the database's key (`signing.py`), loaded at each
election on its own connection: a notification's payload, verified there, is forwarded as the
trigger signed it; a row read from the table is signed by the bus (`Bus.append`). A
notification that does not verify (a role's own NOTIFY) is never appended. On taking the
role the relay also checks that the stream can still take an `XADD *` (`Bus.exhausted`):
after a forged entry with the largest possible id it deletes the stream and appends again
every row above the newest this broker routed, and the readers start again from the
stream's start (`busreader.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import structlog

from ..changes import Change
from ..events import Message
from ..store import Store
from . import changelog
from .backoff import Backoff
from .bus import Bus, BusDown
from .buschanges import ChangeEntry, TailChanges, payload
from .lease import LEASE_MS, Lease
from .notifications import HEALTH_CHECK_TIMEOUT
from .retry import pause
from .source import APPLICATION_NAME, Source, dedicated_connection
from .walcapture import SlotClaim

__all__ = ["LOCK_CLASS", "Appender", "Relay", "lock_name"]

CAMPAIGN_SECONDS = 1.0
# While the lock is held and no lease seen (a relay elected a moment ago takes its lease next,
# or a stale one lost it), a follower asks this often: it is ready again as soon as the new
# relay's lease is there, not up to a second later (the wal soak once measured 1.17 s from
# PostgreSQL's return to every broker ready).
CAMPAIGN_WAITING_SECONDS = 0.1
# How long the lease must stay missing, the lock held, before a follower ends the holder's
# backend: a just-elected relay takes its lease within a round trip to Redis.
TAKEOVER_GRACE_SECONDS = CAMPAIGN_SECONDS
RENEW_SECONDS = LEASE_MS / 1000 / 6  # six renewals per lease: a busy loop may miss a few
LOCK_CLASS = 0x7067  # the advisory lock's first key ('pg'); the second is hashtext(lock_name)
CANDIDATE_NAME = "pgsse-relay-candidate"  # a follower's campaign connection, in pg_stat_activity

log = structlog.get_logger(logger_name=__name__)


class Relay(Source):
    """Campaigns for the relay role and, while holding it, feeds the bus from PostgreSQL.

    `role` is "relay" or "follower"; `connected` says whether its PostgreSQL connection is up.
    `floor_hint` gives the highest row id this broker has routed, for a backfill against an
    empty stream (Redis lost its data).
    """

    name = "relay"
    down_event = "relay_lost"
    failed_event = "relay_campaign_failed"

    def __init__(
        self,
        url: str,
        bus: Bus,
        store: Store,
        floor_hint: Callable[[], int | None],
        captured: Sequence[str] = (),
        claim: SlotClaim | None = None,
    ) -> None:
        super().__init__(url, store)
        self._bus = bus
        self._captured = tuple(captured)  # feeds whose changes the log holds
        self._tail_changes = TailChanges()
        self.claim = claim  # the capture slot to read instead of LISTEN (`BROKER_CAPTURE=wal`)
        self._floor_hint = floor_hint
        self.role = "follower"
        self.elections = 0
        self.appended = 0
        self.takeovers = 0  # stale relays' backends this broker terminated
        self.lease_live = False  # whether a relay (this broker or another) holds a live lease
        self._lease_missing_since: float | None = None  # monotonic; the lock held meanwhile
        self._refused = False  # the holder's backend could not be terminated, this lapse
        self.exhaustions = 0  # streams found exhausted and deleted
        self._appender: Appender | None = None
        self._sizing: asyncio.Future[None] | None = None  # `_learn_sizes`, after a takeover
        self._marking = False  # whether the stream holds what the slot confirmed (elected)
        self._token: str | None = None  # the lease's token while elected
        self.scan: str | None = None  # why the last election scanned; None: it did not

    @property
    def listening(self) -> bool:
        """Whether this broker holds the one LISTEN connection: as the relay, connected."""
        return self.role == "relay" and self.connected

    async def attempt(self, backoff: Backoff) -> None:
        """Campaign on a connection of its own; once elected, serve on it."""
        async with await dedicated_connection(self._url, CANDIDATE_NAME) as conn:
            self.connected = True
            backoff.reset()
            # A poll, not an event: the lock's holder is another process, maybe another host.
            while not await self._won(conn):
                await pause(CAMPAIGN_WAITING_SECONDS if self._waiting() else CAMPAIGN_SECONDS)
            token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            self._token = token  # its marks are written only while the lease is this token's
            async with self._bus.lease(token) as lease:
                self.lease_live = True
                renewing = asyncio.ensure_future(self._renew(conn, lease))
                try:
                    await self._serve(conn)
                finally:
                    renewing.cancel()
                    await asyncio.wait([renewing])  # off the lease's connection before it closes

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The relay's work once elected: LISTEN, load the key, backfill, append every
        notification."""
        # From here on pg_stat_activity shows it as the listener it now is.
        await conn.execute("SELECT set_config('application_name', %s, false)", (APPLICATION_NAME,))
        rows = await self.listen(conn, notify=self.claim is None)
        assert self._key is not None  # loaded by listen
        self._bus.trust(self._key)
        if self.claim is not None:
            await self.claim.campaign(conn)
            async with self.claim.read(conn, self._drained, held=True) as transport:
                await self._elected(conn, rows)
                await self.serve(conn, rows, transport)
            return
        await self._elected(conn, rows)
        await self.serve(conn, rows)

    async def _elected(self, conn: psycopg.AsyncConnection[Any], rows: Store) -> None:
        """Take the role: recover an exhausted stream, backfill rows and changes, start
        appending."""
        self.role = "relay"
        self.elections += 1
        log.info("relay_elected", stream=self._bus.key, elections=self.elections)
        await self._recover_exhausted()
        started = time.monotonic()
        scan, confirmed, mark = await self._must_scan(conn)
        self.scan = scan
        if scan is None:
            await self._take_over(conn, started)
            self._appender = self._new_appender(conn, mark)
            self._release(mark)  # the slot may go up to what the bus holds already
            self._marking = True
            return
        await self._bus.set_wal_mark(None)  # until this backfill is in Redis (the docstring)
        await self._backfill(rows, scan, started)
        self._appender = self._new_appender(conn, -1)
        await self._backfill_changes(conn)  # through the appender, ahead of notifications
        if confirmed is not None:  # wal: the stream now holds every transaction through it
            self._appender.mark(confirmed)
            await self._appender.drained()
        self._marking = True

    def _new_appender(self, conn: psycopg.AsyncConnection[Any], marked: int) -> Appender:
        return Appender(
            self._bus, lambda exc: _cut(conn, exc), self._count, marked, self._release, self._token
        )

    def _release(self, lsn: int) -> None:
        """Redis took the mark `lsn`: the slot may go up to it while idle."""
        if self.claim is not None and self.claim.reading is not None:
            self.claim.reading.release(lsn)

    async def _must_scan(
        self, conn: psycopg.AsyncConnection[Any]
    ) -> tuple[str | None, int | None, int]:
        """Why this takeover must scan the table and read the stream (None: it need not, the
        slot brings all the stream lacks: the module's docstring); the slot's confirmed
        position (wal) and the bus's WAL mark (-1: none)."""
        if self.claim is None:
            return "notify", None, -1
        confirmed = await self.claim.confirmed(conn)
        if self.claim.recreated or confirmed is None:
            return "slot_recreated", confirmed, -1
        mark = await self._bus.wal_mark()
        if mark is None:
            return "no_wal_mark", confirmed, -1
        if confirmed > mark:
            return "slot_past_mark", confirmed, mark
        if await self._bus.length() == 0:
            return "stream_empty", confirmed, mark
        return None, confirmed, mark

    async def _take_over(self, conn: psycopg.AsyncConnection[Any], started: float) -> None:
        """Take the role without a backfill (wal, slot and stream intact): what the stream
        lacks, the slot brings. The feeds' floors are set if new; the byte budget's sizes of
        the stream's entries are learnt while the relay appends (`_learn_sizes`)."""
        self._backfilled = set()  # a previous election's: the slot brings those rows again
        self._tail_changes = TailChanges()
        top = await self._bus.top()
        self._bus.sizes.reset(())
        if top is not None:
            self._sizing = asyncio.ensure_future(self._learn_sizes(conn, top))
        if self._captured:
            last = await changelog.last_positions(conn, self._captured)
            for feed in self._captured:
                await self._bus.floor(last[feed], feed)
        log.info(
            "relay_backfilled", rows=0, scan="skipped", seconds=round(time.monotonic() - started, 3)
        )
        self._store.revive()

    async def _learn_sizes(self, conn: psycopg.AsyncConnection[Any], top: str) -> None:
        """The sizes of the stream's entries through `top`, the newest before this relay's
        first append, read in Redis (not the entries), added under those it appended since."""
        sizes: list[int] = []
        try:
            async for page in self._bus.sizes_through(top):
                sizes.extend(page)
        except BusDown as exc:
            _cut(conn, exc)
            return
        self._bus.sizes.add_older(sizes)
        log.info("relay_sizes_learned", entries=len(sizes), bytes=sum(sizes))

    async def _drained(self) -> None:
        """Before the slot moves on: every row handed to the appender is in Redis, and the
        bus says so (`Bus.set_wal_mark`), so that the next relay need not scan."""
        if self._appender is None:
            return
        reading = self.claim.reading if self.claim is not None else None
        if reading is not None and reading.position is not None:
            self._appender.mark(reading.position)
        await self._appender.drained()

    def _mark_idle(self) -> None:
        """Mark where the slot is while idle (its position follows the server's keepalives
        past others' WAL), so that a relay that stops after a quiet spell or cleanly hands
        over a mark the slot is not past."""
        reading = self.claim.reading if self.claim is not None else None
        if reading is not None and self._appender is not None and self._marking:
            self._appender.mark(reading.idle_end)

    async def _won(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
        """Take the lock if Redis answers and no other broker holds it; also a health check.
        Not taken: check the holder's lease (the module's docstring)."""
        try:
            name = lock_name(self._bus.key, await self._bus.identity())
            holder = await self._bus.lease_holder()
        except BusDown:
            self.lease_live = False
            self._lease_missing_since = None  # unknown: the grace starts again once it answers
            return False
        async with asyncio.timeout(HEALTH_CHECK_TIMEOUT):  # not wait_for: see retry.checkpoint
            cursor = await conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, name)
            )
            row = await cursor.fetchone()
            if row and row[0]:
                self._lease_missing_since = None
                self._refused = False
                return True
            self.lease_live = holder is not None
            self._refused = self._refused and holder is None
            now = time.monotonic()
            if holder is not None:
                self._lease_missing_since = None
            elif self._lease_missing_since is None:
                self._lease_missing_since = now
            elif now - self._lease_missing_since >= TAKEOVER_GRACE_SECONDS:
                await self._terminate_holder(conn, name)
        return False

    def _waiting(self) -> bool:
        """The lock held and no lease seen (an election or a takeover under way): ask every
        `CAMPAIGN_WAITING_SECONDS`; not once the holder's backend could not be ended."""
        return self._lease_missing_since is not None and not self._refused

    async def _terminate_holder(
        self, conn: psycopg.AsyncConnection[tuple[object, ...]], name: str
    ) -> None:
        """The lock's holder left its lease gone for `TAKEOVER_GRACE_SECONDS`: end its backend,
        so the lock passes on. Refused (another role's backend, no pg_signal_backend): log, wait."""
        try:
            cursor = await conn.execute(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted AND classid = %s"
                " AND objid = hashtext(%s)::oid AND objsubid = 2",
                (LOCK_CLASS, name),
            )
            ended = await cursor.fetchall()
        except psycopg.errors.InsufficientPrivilege as exc:
            if not self._refused:  # once per lapse, not every poll
                log.error("takeover_refused", stream=self._bus.key, error=str(exc).strip())
            self._refused = True
            return
        for pid, done in ended:
            if done:
                self.takeovers += 1
                log.warning("relay_stale_terminated", backend_pid=pid, stream=self._bus.key)

    async def _renew(self, conn: psycopg.AsyncConnection[Any], lease: Lease) -> None:
        """Renew the lease until cancelled; a lease lost (expired while this process was
        stopped, taken by another) or a Redis that fails gives the role up."""
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                kept = await lease.renew()
            except BusDown as exc:
                _cut(conn, exc)
                return
            if not kept:
                self.lease_live = False
                _cut(conn, BusDown("relay lease lost"))
                return
            self._mark_idle()

    async def _tail_ids(self) -> set[int]:
        """The ids the stream holds, read in bounded pages; the byte budget's sizes with them."""
        ids: set[int] = set()
        sizes: list[int] = []
        self._tail_changes = TailChanges()
        async for page in self._bus.pages():
            for entry, size in page:
                if isinstance(entry, ChangeEntry):
                    self._tail_changes.add(entry.change)
                else:
                    ids.add(entry.message.id)
                sizes.append(size)
        self._bus.sizes.reset(reversed(sizes))
        return ids

    async def _recover_exhausted(self) -> None:
        """A stream whose last id is the largest possible takes no more entries: delete it,
        and set its floor to the newest row this broker routed, so the backfill appends the
        rows after it (not the whole table)."""
        if not await self._bus.exhausted():
            return
        self.exhaustions += 1
        log.error("bus_stream_exhausted", stream=self._bus.key, action="deleted")
        await self._bus.delete()
        hint = self._floor_hint()
        if hint is not None:
            await self._bus.set_floor(hint)

    async def _backfill(self, rows: Store, reason: str, started: float) -> None:
        """Append every row committed that the stream lacks, in id order (`Source.backfill`).

        Once the stream has been trimmed, ids below its oldest entry cannot be told from
        trimmed ones, so the floor rises to it.
        """
        tail = await self._tail_ids()
        tail_seconds = round(time.monotonic() - started, 3)
        # A new stream's floor (or one Redis lost): the oldest id it holds, else the newest
        # row this broker routed, else the table's last id now, after LISTEN.
        proposed = min(tail) if tail else self._floor_hint() or await rows.last_id()
        floor = await self._bus.floor(proposed)
        if tail and await self._bus.length() >= self._bus.maxlen:
            floor = max(floor, min(tail))
        await self.backfill(rows, floor, tail, scan=reason, tail_seconds=tail_seconds)

    async def _backfill_changes(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Append every change of a captured feed that the stream lacks (`buschanges.py`):
        above the feed's floor on the bus (its last position when the stream's first relay
        took it, kept in Redis), raised to the tail's oldest of the feed once trimmed."""
        if not self._captured:
            return
        tail = self._tail_changes
        last = await changelog.last_positions(conn, self._captured)
        trimmed = await self._bus.length() >= self._bus.maxlen
        floors: dict[str, int] = {}
        for feed in self._captured:
            oldest = tail.oldest(feed)
            floor = await self._bus.floor(last[feed] if oldest is None else oldest, feed)
            if oldest is not None and trimmed:
                floor = max(floor, oldest)
            floors[feed] = floor
        await self.backfill_changes(conn, floors, tail)

    async def emit_page(self, messages: list[Message]) -> None:
        await self._bus.append_many(messages)
        self._count(len(messages))

    def emit(self, message: Message, signed: str | None) -> None:
        """Append a row: a notification as the trigger signed it, a row read by its id as
        a `Message` (the bus signs it)."""
        if self._appender is not None:
            self._appender.put(message if signed is None else signed.encode())

    def emit_change(self, change: Change, signed: str | None) -> None:
        """Append a change: a notification as the trigger signed it, a change read from the
        log signed here with the database's key."""
        if self._appender is None:
            return
        if signed is not None:
            self._appender.put(signed.encode())
        elif self._key is not None:
            self._appender.put(self._key.sign(payload(change)))

    def _count(self, appended: int) -> None:
        self.appended += appended

    def is_up(self) -> bool:
        return self.role == "relay"

    def set_down(self, exc: BaseException) -> None:
        """Give the role up: a failure of the connection, the lease or an append."""
        super().set_down(exc)
        self.role = "follower"
        self.lease_live = False
        self._marking = False
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        if self._sizing is not None:
            self._sizing.cancel()
            self._sizing = None


class Appender:
    """Appends rows to the bus in the order `put` gives them, without waiting for Redis: rows
    that arrive while a pipeline is in flight go together in the next one, so the relay pays
    one round trip per batch, not per row (the scaleout bench saw rows queue behind each
    other's XADD at 500 rows/s on a busy core). A failed batch is reported to `on_failure`
    once, and every later `put` raises it."""

    def __init__(
        self,
        bus: Bus,
        on_failure: Callable[[BusDown], None],
        on_appended: Callable[[int], None],
        marked: int = -1,
        on_marked: Callable[[int], None] | None = None,
        holder: str | None = None,
    ) -> None:
        self._bus = bus
        self._holder = holder  # the lease's token: a mark is written only while it holds it
        self._on_marked = on_marked
        self._on_failure = on_failure
        self._on_appended = on_appended
        self._queue: list[Message | bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._error: BusDown | None = None
        self._mark: int | None = None  # a WAL mark to write once the queue is in Redis
        self._marked = marked  # the last mark written (or found, at the election)

    def put(self, row: Message | bytes) -> None:
        """Append `row`: a `Message`, or a payload signed already (`Bus.append`)."""
        if self._error is not None:
            raise self._error
        self._queue.append(row)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._flush())

    def mark(self, lsn: int) -> None:
        """Once every row `put` so far is in Redis, say that the stream holds every transaction
        through `lsn` (`Bus.set_wal_mark`), on the appends' connection, after them; a mark
        not above the last one is dropped."""
        if self._error is not None:
            raise self._error
        if lsn > (self._marked if self._mark is None else self._mark):
            self._mark = lsn
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._flush())

    async def drained(self) -> None:
        """Wait until every row `put` (and mark) so far is in Redis; raises the failure if
        one failed."""
        while self._task is not None and not self._task.done():
            await asyncio.wait([self._task])
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop appending; rows still queued are left to the next relay's backfill."""
        if self._task is not None:
            self._task.cancel()
        self._queue.clear()
        self._mark = None

    async def _flush(self) -> None:
        try:
            while self._queue or self._mark is not None:
                if self._queue:  # the rows first: a mark holds only once they are in
                    batch, self._queue = self._queue, []
                    await self._bus.append_many(batch)
                    self._on_appended(len(batch))
                    continue
                lsn, self._mark = self._mark, None
                assert lsn is not None
                if not await self._bus.set_wal_mark(lsn, self._holder):
                    raise BusDown("relay lease lost: WAL mark not written")
                self._marked = lsn
                if self._on_marked is not None:
                    self._on_marked(lsn)
        except BusDown as exc:
            self._error = exc
            self._queue.clear()
            self._mark = None
            self._on_failure(exc)


def _cut(conn: psycopg.AsyncConnection[Any], exc: BusDown) -> None:
    """An append failed: give the role up as if the connection had died, by shutting its
    socket down, so the LISTEN loop ends, the lock goes with the connection and the next
    relay's backfill appends what this one could not."""
    log.warning("relay_append_failed", error=str(exc))
    with (
        contextlib.suppress(OSError, psycopg.Error),
        socket.socket(fileno=os.dup(conn.fileno())) as sock,
    ):
        sock.shutdown(socket.SHUT_RDWR)


def lock_name(stream: str, identity: str) -> str:
    """The text whose hashtext is the relay lock's second key: one bus, one lock."""
    return f"{stream}:{identity}"
