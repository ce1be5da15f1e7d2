"""Reading a LISTENing connection: every notification the socket holds, at each wake-up.

psycopg's `notifies()` waits on the socket anew for every batch (a reader added and removed, a
future, a timer, an async generator and the connection's lock), and when rows commit one by
one a batch is one notification: that was most of the 140-200 us of broker CPU per relayed
row `make bench` measured. Here the socket's reader is added once; each time the socket is
readable, everything it holds is read (`consume_input`) and every notification parsed
(`notifies()` until none is left) into a queue, and `next()` takes the whole queue at once.

Queries on the same connection (a row too large for NOTIFY, the health check) run inside
`paused()`, which takes the reader off while psycopg waits on the socket itself. Notifications
psycopg reads meanwhile reach the queue through a notify handler, in the order they came; so
do those that waited in psycopg's backlog before `Notifications` took the connection over.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import psycopg
from psycopg import pq

__all__ = ["HEALTH_CHECK_SECONDS", "HEALTH_CHECK_TIMEOUT", "Notifications"]

HEALTH_CHECK_SECONDS = 5.0  # a quiet connection is checked this often
HEALTH_CHECK_TIMEOUT = 5.0
MAX_READS_PER_WAKE_UP = 64  # a bound on one callback's time; the rest comes at the next
READ_AGAIN_BYTES = 8_192
NOTIFICATION_OVERHEAD = 32  # bytes of a NotificationResponse besides its payload

Fetched = TypeVar("Fetched")


class Notifications:
    """The payloads a LISTENing connection receives, in order, in batches: use as
    `async with Notifications(conn) as notes`, then `await notes.next()` in a loop.

    With `deliver`, payloads that arrive while the consumer waits in `next()` (so every
    earlier one is handled) are handed to it in the reader's callback, with no task switch;
    it returns False for one it cannot handle there (one that needs a query), and that
    payload and those after it go to `next()`, in order. An exception from `deliver` is
    raised by `next()`.
    """

    def __init__(
        self, conn: psycopg.AsyncConnection[Any], deliver: Callable[[str], bool] | None = None
    ) -> None:
        self._conn = conn
        self._deliver = deliver
        self._pgconn = conn.pgconn
        self._encoding = conn.info.encoding
        self._fd = conn.fileno()
        self._loop = asyncio.get_running_loop()
        self._payloads: deque[str] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._armed = False
        self._heard = self._loop.time()  # when the last payload came
        self._quiet_timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Notifications:
        # What psycopg kept while no one read (during a backfill, say) comes first: the
        # backlog, then whatever the socket holds now (timeout=0 polls once).
        self._payloads.extend([n.payload async for n in self._conn.notifies(timeout=0)])
        self._conn.add_notify_handler(self._on_notify)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._disarm()
        self._conn.remove_notify_handler(self._on_notify)
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()

    async def next(self) -> list[str]:
        """Every payload received and not yet taken (nor delivered), at least one: after each
        `HEALTH_CHECK_SECONDS` without any, a health check (`SELECT 1`) runs. Raises what
        the connection raises when it fails (`psycopg.OperationalError`, `TimeoutError`)."""
        while not self._payloads:
            if self._error is not None:
                raise self._error
            if not await self._wait():
                async with self.paused(), asyncio.timeout(HEALTH_CHECK_TIMEOUT):
                    await self._conn.execute("SELECT 1")  # not wait_for: see retry.checkpoint
                self._heard = self._loop.time()
        batch = list(self._payloads)
        self._payloads.clear()
        return batch

    async def read(self, fetch: Callable[[], Awaitable[Fetched | None]]) -> Fetched | None:
        """Run `fetch`, a query on the connection, `paused()` (`source.Transport`)."""
        async with self.paused():
            return await fetch()

    async def confirm(self) -> None:
        """Nothing to confirm: NOTIFY keeps nothing for a listener (`source.Transport`)."""

    async def _wait(self) -> bool:
        """Wait until the reader has something (payloads or an error); False when nothing
        came for `HEALTH_CHECK_SECONDS`.

        One timer for the quiet, moved on only when it fires, not one per wait; and not
        `asyncio.timeout()`, which asks for the running loop three times, a `getpid()`
        system call each on Python 3.11 (7% of the relay's profile).
        """
        self._arm()
        waiter = self._waiter = self._loop.create_future()
        if self._quiet_timer is None:
            self._on_quiet_timer()
        try:
            await waiter
        finally:
            self._waiter = None
        return bool(self._payloads) or self._error is not None

    def _on_quiet_timer(self) -> None:
        self._quiet_timer = None
        quiet_until = self._heard + HEALTH_CHECK_SECONDS
        if self._loop.time() >= quiet_until:
            self._wake()
        elif self._waiter is not None:
            self._quiet_timer = self._loop.call_at(quiet_until, self._on_quiet_timer)

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Around a query on the connection: psycopg waits on the socket meanwhile."""
        self._disarm()
        try:
            yield
        finally:
            self._take_parsed()  # libpq may hold some it parsed after the query's results

    def _arm(self) -> None:
        if not self._armed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._armed = True

    def _disarm(self) -> None:
        if self._armed:
            self._armed = False
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        # libpq reads at most its buffer (16 KB at first) per call: a round that brought
        # less than half of that found the socket empty; after a fuller one, read again.
        try:
            for _ in range(MAX_READS_PER_WAKE_UP):
                self._pgconn.consume_input()
                if self._take_parsed() < READ_AGAIN_BYTES:
                    break
            if self._pgconn.status == pq.ConnStatus.BAD:
                raise psycopg.OperationalError("the listening connection is closed")
        except psycopg.Error as exc:
            self._fail(exc)
        if self._payloads:
            self._heard = self._loop.time()
            if self._deliver is not None and self._waiter is not None:
                self._deliver_here(self._deliver)
        if self._payloads or self._error is not None:
            self._wake()

    def _deliver_here(self, deliver: Callable[[str], bool]) -> None:
        payloads = self._payloads
        try:
            while payloads and deliver(payloads[0]):
                payloads.popleft()
        except Exception as exc:  # a bug: next() raises it, as it would from its caller
            payloads.popleft()
            self._fail(exc)

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        self._disarm()  # before any other socket can take the descriptor's number

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _take_parsed(self) -> int:
        """Queue what libpq has parsed; about how many bytes of the socket that was."""
        notifies, append, encoding = self._pgconn.notifies, self._payloads.append, self._encoding
        size = 0
        while (notify := notifies()) is not None:
            append(notify.extra.decode(encoding))
            size += len(notify.extra) + NOTIFICATION_OVERHEAD
        return size

    def _on_notify(self, notify: psycopg.Notify) -> None:
        self._payloads.append(notify.payload)
