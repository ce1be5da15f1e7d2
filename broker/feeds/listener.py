"""The one LISTENing PostgreSQL connection of this process, its recovery and backfill.

`Listener.run` holds a single autocommit `AsyncConnection` that LISTENs on `CHANNEL`, parses
each notification once and hands the message to the hub. When the connection dies
(`pg_terminate_backend`, a restart, a network cut found by the periodic health check) it
reconnects with capped, jittered backoff, LISTENs again, and then backfills from the table every
row it has not delivered, before any notification that arrived meanwhile: so rows committed
during the outage reach their subscribers once, in order.

Everything runs on the listening connection itself (backfill, rows too large for NOTIFY,
health check), never through the store's pool: the listener is back as soon as PostgreSQL
is, whatever the pool is doing. `Notifications` reads every notification the socket holds at
each wake-up, and keeps in order those that arrive while a query runs. The reconnect delay is
capped at `RECONNECT_MAX_SECONDS`, so a returning server is noticed within half a second (measured:
`tests/test_recovery.py`, issue 14 found 4.8 s and 11.3 s with a 5 s cap and a pooled
backfill).

`started` is set at the first LISTEN: streams wait for it before they read anything, so no
row can commit between a stream's read of the table and the first LISTEN unseen (issue 14).
The hub's journal removes the overlap between the backfill and the notifications of rows
committed while it ran.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import structlog

from ..errors import BrokerError
from ..events import Message, Reference, parse_notification
from ..hub import Hub
from ..signing import BadSignature, Refusals, RowKey
from ..store import Store
from .backoff import Backoff
from .notifications import Notifications
from .retry import retry_forever

__all__ = ["APPLICATION_NAME", "CHANNEL", "CONNECTION_FAILURES", "Listener", "dedicated_connection"]

CHANNEL = "pgsse_messages"
APPLICATION_NAME = "pgsse-listener"  # how pg_stat_activity shows it
RECONNECT_MAX_SECONDS = 0.5
# What ends a dedicated connection's loop when the server goes (retried, not a crash).
CONNECTION_FAILURES = (psycopg.Error, BrokerError, OSError, TimeoutError)
BACKFILL_PAGE = 1_000

log = structlog.get_logger(logger_name="broker.feeds.listener")


async def dedicated_connection(url: str, application_name: str) -> psycopg.AsyncConnection[Any]:
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


class Listener:
    """Feeds the hub from PostgreSQL. `connected` is what `/readyz` reports."""

    def __init__(self, url: str, hub: Hub, store: Store) -> None:
        self._url = url
        self._hub = hub
        self._store = store
        self._floor: int | None = None  # rows up to this id committed before the first LISTEN
        self._key: RowKey | None = None  # loaded at each connect (signing.py)
        self.started = asyncio.Event()
        self.connected = False
        self.reconnects = 0
        self.notifications = 0
        self.backfilled = 0
        self.refused = Refusals(log, "notification_refused")  # unsigned, or malformed

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after any failure."""
        await retry_forever(
            self._listen,
            self._set_down,
            expected=CONNECTION_FAILURES,
            crashed="listener_crashed",
            log=log,
            backoff=Backoff(maximum=RECONNECT_MAX_SECONDS),
        )

    async def _listen(self, backoff: Backoff) -> None:
        async with await dedicated_connection(self._url, APPLICATION_NAME) as conn:
            await conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(CHANNEL)))
            rows = self._store.using(conn)
            self._key = await rows.row_key()
            if self._floor is None:
                self._floor = await rows.last_id()
            else:
                await self._backfill(rows)
                self.reconnects += 1
                self._store.revive()
            self.connected = True
            self.started.set()
            backoff.reset()
            log.info("listener_up", channel=CHANNEL, floor=self._floor, reconnects=self.reconnects)
            async with Notifications(conn, self._deliver_now) as notes:
                while True:
                    for payload in await notes.next():
                        if not self._deliver_now(payload):
                            await self._deliver_reference(payload, rows, notes)

    async def _backfill(self, rows: Store) -> None:
        """Deliver every row committed while the connection was down, in id order.

        Every id the journal does not hold is looked for, down to the first LISTEN or the
        journal's horizon, not only above the last id delivered: a transaction that drew its
        id before that row and committed during the outage is found too. Notifications wait
        in the connection meanwhile; the journal drops the ones the backfill delivered.
        """
        journal = self._hub.journal
        if self._hub.reused_from is not None:  # ids were reused: look again from there
            self._floor = min(self._floor or 0, self._hub.reused_from - 1)
            self._hub.reused_from = None
        floor = max(self._floor or 0, journal.forgotten_up_to)
        missing = [i for i in await rows.ids_after(floor) if i not in journal]
        for start in range(0, len(missing), BACKFILL_PAGE):
            page = missing[start : start + BACKFILL_PAGE]
            found = await rows.by_ids(page)
            for message_id in page:
                if message_id in found:
                    self._deliver(found[message_id])
        self.backfilled += len(missing)
        log.info("listener_backfilled", after_id=floor, rows=len(missing))

    def _deliver_now(self, payload: str) -> bool:
        """Deliver a notification's message; False, doing nothing, for a row too large for
        NOTIFY (a `Reference`: reading it takes a query). A payload not signed with the
        database's key (a role's own NOTIFY), or malformed, is dropped: counted and logged
        without its content."""
        try:
            parsed = self._parse(payload)
        except ValueError as exc:
            self.notifications += 1
            self.refused.add(error=str(exc), bytes=len(payload))
            return True
        if isinstance(parsed, Reference):
            return False
        self.notifications += 1
        self._deliver(parsed)
        return True

    def _parse(self, payload: str) -> Message | Reference:
        """The verified, parsed payload. Raises `ValueError` (`BadSignature` included)."""
        if self._key is None:
            raise BadSignature("no key loaded")
        return parse_notification(self._key.verify(payload))

    async def _deliver_reference(self, payload: str, rows: Store, notes: Notifications) -> None:
        reference = self._parse(payload)  # verified once already; a rare, short payload
        self.notifications += 1
        async with notes.paused():
            message = await rows.get(reference.id)
        if message is None:
            log.warning("notification_row_missing", id=reference.id)
            return
        self._deliver(message)

    def _deliver(self, message: Message) -> None:
        if self._hub.is_new(message):
            self._hub.publish(message)

    def _set_down(self, exc: BaseException) -> None:
        if self.connected:
            log.warning("listener_down", error=f"{type(exc).__name__}: {exc}".strip())
        else:
            log.info("listener_connect_failed", error=f"{type(exc).__name__}: {exc}".strip())
        self.connected = False
