"""A feed's core: one dedicated PostgreSQL connection that LISTENs for the trigger's rows.

The listener (`listener.py`, which feeds this process's hub) and the relay (`relay.py`, which
feeds the bus) are two ends of one job, and this module is that job. A `Source`:

- connects outside the store's pool (`dedicated_connection`: autocommit, TCP keepalives), so
  it is back as soon as PostgreSQL is, whatever the pool is doing, and reconnects after any
  failure with a backoff capped at `RECONNECT_MAX_SECONDS` (`run`, on `retry.retry_forever`);
- LISTENs on `CHANNEL` (rows) and `capture.CHANNEL` (changes of declared feeds) on that one
  connection, so rows and changes arrive together in commit order, and loads the database's
  key (`signing.py`) on it;
- backfills: every row above a floor that its end does not hold yet (the hub's journal, the
  stream's tail) is read, `BACKFILL_PAGE` ids at a time, in id order, and handed to its end
  before any notification that queued meanwhile; notifications of the rows it handed are then
  dropped. The backfill runs on the connection itself, never through the pool, and revives
  the pool (`Store.revive`) once it is done, so replays reconnect within the same second;
- verifies and parses every notification (`Notifications`, which reads every payload the
  socket holds at each wake-up and health-checks a quiet connection), drops one not signed
  with the database's key or malformed (`notification_refused`, rate-limited), and reads a
  row too large for NOTIFY by its id, on the connection; a verified payload that starts with
  `{"feed":` (the capture trigger writes that first) is a change (`changes.parse_change`),
  handed to `emit_change`, and a change too large for NOTIFY is read from the change log
  (`changelog.fetch`) on the connection too;
- says once, in its end's words, that it went down or could not connect (`set_down`).

The ends give it a name for its log events (`<name>_backfilled`, `<name>_crashed`) and what
to do with a row (`emit`, `emit_page`) and a change (`emit_change`); the listener decides its
floor against the hub's journal, the relay campaigns for its role and decides its floor
against the bus.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

import psycopg
import structlog
from psycopg import sql

from ..changes import Change, ChangeReference, parse_change
from ..errors import BrokerError
from ..events import Message, Reference, parse_notification
from ..log import Refusals
from ..signing import BadSignature, RowKey, refusal_reason
from ..store import Store
from . import capture, changelog
from .backoff import Backoff
from .notifications import Notifications
from .retry import retry_forever

__all__ = [
    "APPLICATION_NAME",
    "BACKFILL_PAGE",
    "CHANNEL",
    "CONNECTION_FAILURES",
    "RECONNECT_MAX_SECONDS",
    "ChangesHeld",
    "Source",
    "Transport",
    "dedicated_connection",
]

CHANNEL = "pgsse_messages"
APPLICATION_NAME = "pgsse-listener"  # how pg_stat_activity shows a listening connection
# A returning server is noticed within half a second (tests/system/test_recovery.py measures it).
RECONNECT_MAX_SECONDS = 0.5
# What ends a dedicated connection's loop when the server goes (retried, not a crash).
CONNECTION_FAILURES = (psycopg.Error, BrokerError, OSError, TimeoutError)
BACKFILL_PAGE = 1_000
CHANGE_PREFIX = b'{"feed":'  # how a change's payload starts (`capture.py` writes it first)

log = structlog.get_logger(logger_name=__name__)

Connection = psycopg.AsyncConnection[Any]
Fetched = TypeVar("Fetched")


async def dedicated_connection(url: str, application_name: str) -> Connection:
    """A connection of its own, outside the pool, for LISTEN or the relay's lock: autocommit,
    with TCP keepalives so a silent network cut ends it within about 25 s."""
    return await psycopg.AsyncConnection.connect(
        url,
        autocommit=True,
        application_name=application_name,
        connect_timeout=5,
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
    )


class Transport(Protocol):
    """Where a source's payloads come from: LISTEN (`Notifications`) or the capture slot
    (`walcapture.SlotTransport`). `next()` gives them in commit order: signed payloads, or
    (the slot) rows decoded from the WAL, a `Message` or a `Reference`; `read(fetch)`
    runs `fetch`, a query on the source's connection for a payload just received (a row too
    large for it); `confirm()` says the last batch was handed on (the slot moves past it;
    LISTEN has nothing to confirm)."""

    async def next(self) -> Sequence[str | Message | Reference]: ...

    async def read(self, fetch: Callable[[], Awaitable[Fetched | None]]) -> Fetched | None: ...

    async def confirm(self) -> None: ...


class ChangesHeld(Protocol):
    """What an end holds of each feed's changes (`feedset.FeedSet` for the listener)."""

    def holds(self, feed: str, position: int) -> bool: ...

    def forgotten_up_to(self, feed: str) -> int: ...


class Source:
    """The LISTENing end of PostgreSQL that a listener or a relay is (module docstring).

    A subclass sets `name`, `down_event` and `failed_event`, and implements `attempt` (one
    connection's life: connect, `listen`, `backfill`, `serve`), `emit` and `emit_page`.
    `connected`, `notifications`, `backfilled` and `refused` are what stats and `/metrics`
    report.
    """

    name: ClassVar[str]
    down_event: ClassVar[str]  # logged when a connection that was up is lost
    failed_event: ClassVar[str]  # logged when no connection could be made

    def __init__(self, url: str, store: Store) -> None:
        self._url = url
        self._store = store
        self._key: RowKey | None = None  # loaded at each connect
        self._backfilled: set[int] = set()  # ids the last backfill emitted
        self.connected = False
        self.notifications = 0
        self.backfilled = 0
        self.refused = Refusals(log)  # unsigned, or malformed

    async def run(self) -> None:
        """Run `attempt` until cancelled, again after any failure."""
        await retry_forever(
            self.attempt,
            self.set_down,
            expected=CONNECTION_FAILURES,
            crashed=f"{self.name}_crashed",
            log=log,
            backoff=Backoff(maximum=RECONNECT_MAX_SECONDS),
        )

    async def attempt(self, backoff: Backoff) -> None:
        """One connection's life; resets `backoff` once connected. Ends by raising."""
        raise NotImplementedError

    def emit(self, message: Message, signed: str | None) -> None:
        """Hand on one row: `signed` is the trigger's payload it came in, None for a row read
        from the table."""
        raise NotImplementedError

    async def emit_page(self, messages: list[Message]) -> None:
        """Hand on a page of rows a backfill read, in id order."""
        raise NotImplementedError

    def emit_change(self, change: Change, signed: str | None) -> None:
        """Hand on one change of a declared feed: `signed` is the trigger's payload it came
        in, None for a change read from the log."""
        raise NotImplementedError

    def is_up(self) -> bool:
        """Whether a failure now loses a live connection (`down_event`) rather than an
        attempt to make one (`failed_event`)."""
        return self.connected

    async def listen(self, conn: Connection, notify: bool = True) -> Store:
        """LISTEN on `conn` (unless `notify` is False: the capture slot brings the payloads)
        and load the key; the store's queries, run on `conn`."""
        if notify:
            for channel in (CHANNEL, capture.CHANNEL):
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        rows = self._store.using(conn)
        self._key = await rows.row_key()
        return rows

    async def backfill(
        self, rows: Store, floor: int, held: Container[int], **logged: object
    ) -> None:
        """Emit every row above `floor` that `held` lacks, in id order, on `rows`' connection;
        then revive the store's pool. Every missing id is looked for, not only those above
        the newest held: a transaction that drew its id before a held row and committed while
        no one listened is found too. `logged`: more fields for `<name>_backfilled`."""
        started = time.monotonic()
        missing = [i for i in await rows.ids_after(floor) if i not in held]
        self._backfilled = set(missing)
        for start in range(0, len(missing), BACKFILL_PAGE):
            page = missing[start : start + BACKFILL_PAGE]
            found = await rows.by_ids(page)
            await self.emit_page([found[i] for i in page if i in found])
        self.backfilled += len(missing)
        log.info(
            f"{self.name}_backfilled",
            after_id=floor,
            rows=len(missing),
            scan_seconds=round(time.monotonic() - started, 3),
            **logged,
        )
        self._store.revive()

    async def backfill_changes(
        self, conn: Connection, floors: Mapping[str, int], held: ChangesHeld
    ) -> None:
        """Emit every change of each feed of `floors` above its floor (raised to what its
        journal forgot) that `held` lacks, in position order, read from the change log on
        `conn` a bounded page at a time: changes committed while no one listened. Their
        notifications, if any queued meanwhile, are dropped by the hubs (their journals)."""
        everything = changelog.Match()
        emitted = 0
        for feed, floor in floors.items():
            after = max(floor, held.forgotten_up_to(feed))
            while True:
                page = await changelog.read(conn, feed, "", after, everything)
                for change in page.changes:
                    if not held.holds(feed, change.position):
                        self.emit_change(change, None)
                        emitted += 1
                if page.done:
                    break
                after = page.through
        log.info(f"{self.name}_changes_backfilled", feeds=len(floors), changes=emitted)

    async def serve(
        self, conn: Connection, rows: Store, transport: Transport | None = None
    ) -> None:
        """Emit every payload's row or change, in order, until the connection fails
        (raises): from LISTEN on `conn`, or from `transport` (the capture slot), confirming
        each batch once it was handed on."""
        if transport is not None:
            await self._pump(transport, conn, rows)
            return
        async with Notifications(conn, self._emit_now) as notes:
            await self._pump(notes, conn, rows)

    async def _pump(self, transport: Transport, conn: Connection, rows: Store) -> None:
        while True:
            for item in await transport.next():
                if isinstance(item, str):
                    if not self._emit_now(item):
                        await self._emit_reference(item, conn, rows, transport)
                    continue
                # A row decoded from the WAL: the table's own, so nothing to verify.
                self.notifications += 1
                if isinstance(item, Message):
                    if item.id not in self._backfilled:
                        self.emit(item, None)
                else:
                    await self._emit_row(item, rows, transport)
            await transport.confirm()

    def set_down(self, exc: BaseException) -> None:
        """The connection failed: log it once, in the end's words, and mark it down."""
        error = f"{type(exc).__name__}: {exc}".strip()
        if self.is_up():
            log.warning(self.down_event, error=error)
        else:
            log.info(self.failed_event, error=error)
        self.connected = False

    def _emit_now(self, payload: str) -> bool:
        """Emit a notification's row or change; False, doing nothing, for one too large for
        NOTIFY (a `Reference` or `ChangeReference`: reading it takes a query). A payload not
        signed with the database's key (a role's own NOTIFY), or malformed, is dropped:
        counted and logged without its content."""
        try:
            parsed = self._parse(payload)
        except ValueError as exc:  # BadSignature too
            self.notifications += 1
            self.refused.error(
                "notification_refused", refusal_reason(exc), bytes=len(payload), error=str(exc)
            )
            return True
        if isinstance(parsed, Message):
            self.notifications += 1
            if parsed.id not in self._backfilled:
                self.emit(parsed, payload)
            return True
        if isinstance(parsed, Change):
            self.notifications += 1
            self.emit_change(parsed, payload)  # its hub drops a copy a backfill handed on
            return True
        return False

    def _parse(self, payload: str) -> Message | Reference | Change | ChangeReference:
        """The verified, parsed payload. Raises `ValueError` (`BadSignature` included)."""
        if self._key is None:
            raise BadSignature("no key loaded")
        verified = self._key.verify(payload)
        if verified.startswith(CHANGE_PREFIX):
            return parse_change(verified)
        return parse_notification(verified)

    async def _emit_reference(
        self, payload: str, conn: Connection, rows: Store, notes: Transport
    ) -> None:
        reference = self._parse(payload)  # verified once already; a rare, short payload
        self.notifications += 1
        if isinstance(reference, ChangeReference):
            change = await notes.read(
                lambda: changelog.fetch(conn, reference.feed, reference.position)
            )
            if change is None:  # pruned meanwhile: a resume from before it gets `reset`
                log.warning("change_missing", feed=reference.feed, position=reference.position)
            else:
                self.emit_change(change, None)
            return
        assert isinstance(reference, Reference)
        await self._emit_row(reference, rows, notes)

    async def _emit_row(self, reference: Reference, rows: Store, notes: Transport) -> None:
        """Read the row of `reference` on the source's connection and emit it."""
        if reference.id in self._backfilled:
            return
        message = await notes.read(lambda: rows.get(reference.id))
        if message is None:
            log.warning("notification_row_missing", id=reference.id)
            return
        self.emit(message, None)
