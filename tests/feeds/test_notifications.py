"""Reading a LISTENing connection in batches, in process, against the real cluster."""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from broker.feeds import notifications
from broker.feeds.notifications import Notifications
from tests.support.database import Database


@pytest.fixture
def channel() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def listening(
    database: Database, channel: str
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(database.url, autocommit=True) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        yield conn


def notify(database: Database, channel: str, payloads: list[str], each_committed: bool) -> None:
    """From another connection: one transaction per payload, or one for all of them."""
    with psycopg.connect(database.url, autocommit=each_committed) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        if not each_committed:
            conn.commit()


async def take(notes: Notifications, count: int, timeout: float = 20.0) -> list[list[str]]:
    """The batches `next()` gives until `count` payloads came."""
    batches: list[list[str]] = []
    async with asyncio.timeout(timeout):
        while sum(map(len, batches)) < count:
            batches.append(await notes.next())
    return batches


def counting_add_reader(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How often the running loop's `add_reader` is called from here on."""
    loop = asyncio.get_running_loop()
    calls = 0
    real = loop.add_reader

    def add_reader(fd: Any, callback: Callable[..., object], *args: Any) -> None:
        nonlocal calls
        calls += 1
        real(fd, callback, *args)

    monkeypatch.setattr(loop, "add_reader", add_reader)
    return lambda: calls


async def test_rows_committed_one_by_one_arrive_in_order_with_one_reader(
    database: Database,
    listening: psycopg.AsyncConnection[Any],
    channel: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payloads = [str(i) for i in range(2_000)]
    async with Notifications(listening) as notes:
        added = counting_add_reader(monkeypatch)
        writer = asyncio.create_task(
            asyncio.to_thread(notify, database, channel, payloads, each_committed=True)
        )
        batches = await take(notes, len(payloads))
        await writer
    assert [p for batch in batches for p in batch] == payloads
    assert added() == 1  # not re-armed per notification, nor per batch


async def test_one_wake_up_takes_every_notification_the_socket_holds(
    database: Database, listening: psycopg.AsyncConnection[Any], channel: str
) -> None:
    payloads = [f"{i}:" + "x" * 100 for i in range(500)]
    # NotificationResponse: type, length, backend pid, channel and payload with their NULs.
    size = sum(1 + 4 + 4 + len(channel) + 1 + len(p) + 1 for p in payloads)
    async with Notifications(listening) as notes:
        # Committed before anyone reads, and waited for until all ~60 KB are on the socket
        # (libpq reads at most 16 KB per call).
        await asyncio.to_thread(notify, database, channel, payloads, each_committed=False)
        async with asyncio.timeout(20):
            while unread_bytes(listening.fileno()) < size:  # noqa: ASYNC110 (no event for it)
                await asyncio.sleep(0.01)
        batches = await take(notes, len(payloads))
    assert batches == [payloads]


def unread_bytes(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


async def test_notifications_during_a_query_and_in_psycopgs_backlog_keep_their_order(
    database: Database, listening: psycopg.AsyncConnection[Any], channel: str
) -> None:
    # Read by psycopg during a query before `Notifications` takes over: its backlog.
    await asyncio.to_thread(notify, database, channel, ["1", "2"], each_committed=True)
    await listening.execute("SELECT pg_sleep(0.2)")
    async with Notifications(listening) as notes:
        await asyncio.to_thread(notify, database, channel, ["3"], each_committed=True)
        async with notes.paused():
            # Its own NOTIFY reaches the connection in the query's answer, and one from
            # elsewhere arrives while the query sleeps.
            await listening.execute("SELECT pg_notify(%s, '4')", (channel,))
            sleeping = listening.execute("SELECT pg_sleep(0.3)")
            await asyncio.gather(
                sleeping, asyncio.to_thread(notify, database, channel, ["5"], each_committed=True)
            )
        await asyncio.to_thread(notify, database, channel, ["6", "7"], each_committed=True)
        batches = await take(notes, 7)
    assert [p for batch in batches for p in batch] == ["1", "2", "3", "4", "5", "6", "7"]


async def test_a_quiet_connection_is_health_checked_again_and_again(
    database: Database,
    listening: psycopg.AsyncConnection[Any],
    channel: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(notifications, "HEALTH_CHECK_SECONDS", 0.05)
    backend = listening.info.backend_pid
    async with Notifications(listening) as notes:
        reading = asyncio.create_task(notes.next())
        checks: set[object] = set()  # the start times of the `SELECT 1`s seen
        deadline = time.monotonic() + 20
        while len(checks) < 3:
            query, started = await asyncio.to_thread(last_query, database, backend)
            if query == "SELECT 1":
                checks.add(started)
            assert time.monotonic() < deadline, f"health checks seen: {len(checks)}"
            await asyncio.sleep(0.02)
        assert not reading.done()
        await asyncio.to_thread(notify, database, channel, ["after"], each_committed=True)
        assert await asyncio.wait_for(reading, 20) == ["after"]


def last_query(database: Database, backend: int) -> tuple[str, object]:
    rows = database.query(
        "SELECT query, query_start FROM pg_stat_activity WHERE pid = %s", (backend,)
    )
    return (str(rows[0][0]), rows[0][1]) if rows else ("", None)


async def test_a_terminated_connection_raises_after_what_it_delivered(
    database: Database, listening: psycopg.AsyncConnection[Any], channel: str
) -> None:
    async with Notifications(listening) as notes:
        await asyncio.to_thread(notify, database, channel, ["before"], each_committed=True)
        assert await asyncio.wait_for(notes.next(), 20) == ["before"]
        backend = listening.info.backend_pid
        database.query("SELECT pg_terminate_backend(%s)", (backend,))
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(notes.next(), 20)
        with pytest.raises(psycopg.OperationalError):  # and again, not a hang
            await asyncio.wait_for(notes.next(), 20)


async def test_deliver_takes_payloads_in_the_callback_and_next_gets_the_rest_in_order(
    database: Database, listening: psycopg.AsyncConnection[Any], channel: str
) -> None:
    delivered: list[str] = []
    sixth = asyncio.Event()

    def deliver(payload: str) -> bool:
        if payload.startswith("query"):
            return False
        delivered.append(payload)
        if payload == "6":
            sixth.set()
        return True

    async with Notifications(listening, deliver) as notes:
        reading = asyncio.create_task(notes.next())
        await asyncio.to_thread(notify, database, channel, ["1", "2"], each_committed=True)
        await asyncio.to_thread(
            notify, database, channel, ["3", "query-4", "5"], each_committed=False
        )
        batch = await asyncio.wait_for(reading, 20)
        assert delivered == ["1", "2", "3"]
        assert batch == ["query-4", "5"]  # the consumer handles these, then waits again
        reading = asyncio.create_task(notes.next())
        await asyncio.to_thread(notify, database, channel, ["6"], each_committed=True)
        await asyncio.wait_for(sixth.wait(), 20)
        assert delivered == ["1", "2", "3", "6"] and not reading.done()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading


async def test_an_exception_from_deliver_is_raised_by_next(
    database: Database, listening: psycopg.AsyncConnection[Any], channel: str
) -> None:
    def deliver(payload: str) -> bool:
        raise RuntimeError(f"bug on {payload}")

    async with Notifications(listening, deliver) as notes:
        reading = asyncio.create_task(notes.next())
        await asyncio.to_thread(notify, database, channel, ["boom"], each_committed=True)
        with pytest.raises(RuntimeError, match="bug on boom"):
            await asyncio.wait_for(reading, 20)
