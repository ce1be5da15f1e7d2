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
backfill already appended are skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
import structlog
from psycopg import sql

from .backoff import Backoff
from .bus import Bus, BusDown
from .errors import BrokerError
from .events import Message, Reference, parse_notification
from .listener import (
    APPLICATION_NAME,
    CHANNEL,
    HEALTH_CHECK_SECONDS,
    HEALTH_CHECK_TIMEOUT,
    dedicated_connection,
)
from .retry import pause, retry_forever
from .store import Store

__all__ = ["LOCK_CLASS", "Relay"]

CAMPAIGN_SECONDS = 1.0
LOCK_CLASS = 0x7067  # the advisory lock's first key ('pg'); the second is hashtext(stream)
BACKFILL_PAGE = 1_000
CANDIDATE_NAME = "pgsse-relay-candidate"  # a follower's campaign connection, in pg_stat_activity

log = structlog.get_logger(logger_name="broker.relay")


class Relay:
    """Campaigns for the relay role and, while holding it, feeds the bus from PostgreSQL.

    `role` is "relay" or "follower"; `connected` says whether its PostgreSQL connection is up.
    `floor_hint` gives the highest row id this broker has routed, for a backfill against an
    empty stream (Redis lost its data).
    """

    def __init__(
        self, url: str, bus: Bus, store: Store, floor_hint: Callable[[], int | None]
    ) -> None:
        self._url = url
        self._bus = bus
        self._store = store
        self._floor_hint = floor_hint
        self._backfilled: set[int] = set()
        self.role = "follower"
        self.connected = False
        self.elections = 0
        self.appended = 0
        self.backfilled = 0
        self.notifications = 0

    @property
    def listening(self) -> bool:
        """Whether this broker holds the one LISTEN connection: as the relay, connected."""
        return self.role == "relay" and self.connected

    async def run(self) -> None:
        """Campaign until cancelled; after any failure, give the role up and campaign again."""
        await retry_forever(
            self._campaign,
            self._step_down,
            expected=(psycopg.Error, BrokerError, OSError, TimeoutError),
            crashed="relay_crashed",
            log=log,
        )

    async def _campaign(self, backoff: Backoff) -> None:
        async with await dedicated_connection(self._url, CANDIDATE_NAME) as conn:
            self.connected = True
            backoff.reset()
            # A poll, not an event: the lock's holder is another process, maybe another host.
            while not await self._won(conn):
                await pause(CAMPAIGN_SECONDS)
            # From here on pg_stat_activity shows it as the listener it now is.
            await conn.execute(
                "SELECT set_config('application_name', %s, false)", (APPLICATION_NAME,)
            )
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            self.role = "relay"
            self.elections += 1
            log.info("relay_elected", stream=self._bus.key, elections=self.elections)
            await self._backfill()
            while True:
                async for notify in conn.notifies(timeout=HEALTH_CHECK_SECONDS):
                    await self._handle(notify.payload)
                await asyncio.wait_for(conn.execute("SELECT 1"), HEALTH_CHECK_TIMEOUT)

    async def _won(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> bool:
        """Take the lock if Redis answers and no other broker holds it; also a health check."""
        try:
            await self._bus.ping()
        except BusDown:
            return False
        async with asyncio.timeout(HEALTH_CHECK_TIMEOUT):  # not wait_for: see retry.checkpoint
            cursor = await conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, self._bus.key)
            )
            row = await cursor.fetchone()
        return bool(row and row[0])

    async def _backfill(self) -> None:
        """Append every row committed that the stream lacks, in id order.

        Every id above the bus's floor that the stream's tail does not hold is looked for,
        not only those above its oldest or newest entry: a transaction that drew its id before
        a row the stream holds and committed while no relay listened is found too (as the
        listener's backfill does against its journal). Once the stream has been trimmed, ids
        below its oldest entry cannot be told from trimmed ones, so the floor rises to it.
        """
        tail = {entry.message.id for entry in await self._bus.tail()}
        # A new stream's floor (or one Redis lost): the oldest id it holds, else the newest
        # row this broker routed, else the table's last id now, after LISTEN.
        proposed = min(tail) if tail else self._floor_hint() or await self._store.last_id()
        floor = await self._bus.floor(proposed)
        if tail and await self._bus.length() >= self._bus.maxlen:
            floor = max(floor, min(tail))
        missing = [i for i in await self._store.ids_after(floor) if i not in tail]
        self._backfilled = set(missing)
        for start in range(0, len(missing), BACKFILL_PAGE):
            page = missing[start : start + BACKFILL_PAGE]
            rows = await self._store.by_ids(page)
            for message_id in page:
                if message_id in rows:
                    await self._append(rows[message_id])
        self.backfilled += len(missing)
        log.info("relay_backfilled", after_id=floor, rows=len(missing))

    async def _handle(self, payload: str) -> None:
        self.notifications += 1
        try:
            parsed = parse_notification(payload)
        except ValueError as exc:
            log.error("notification_malformed", error=str(exc), payload=payload[:200])
            return
        if parsed.id in self._backfilled:
            return
        message = await self._store.get(parsed.id) if isinstance(parsed, Reference) else parsed
        if message is None:
            log.warning("notification_row_missing", id=parsed.id)
            return
        await self._append(message)

    async def _append(self, message: Message) -> None:
        await self._bus.append(message)
        self.appended += 1

    def _step_down(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}".strip()
        if self.role == "relay":
            log.warning("relay_lost", error=error)
        else:
            log.info("relay_campaign_failed", error=error)
        self.role = "follower"
        self.connected = False
