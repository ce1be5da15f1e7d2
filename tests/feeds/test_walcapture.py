"""The capture slot's one reader (`SlotClaim`): the lock, a stale reader ended, an invalidated
slot made again, a batch confirmed only once handed on; the lag monitor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import psycopg
import pytest

from broker.events import Message
from broker.feeds.wal import Item
from broker.feeds.walcapture import (
    BATCH_INTERVAL_SECONDS,
    PREFIXES,
    READER_NAME,
    CaptureMonitor,
    SlotClaim,
)
from broker.feeds.walstream import SlotStream
from tests.support.database import Database, invalidate_slots
from tests.support.wal import WalDatabase

TIMEOUT = 10.0


async def sampled(condition: Callable[[], bool]) -> None:
    """Until the monitor's sample says `condition` (it samples every second: a poll)."""
    for _ in range(int(TIMEOUT / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("no such sample")


def ids(batch: Sequence[Item]) -> list[int]:
    """The ids of a batch's rows (decoded from the WAL: `Message`s)."""
    return [item.id for item in batch if isinstance(item, Message)]


async def connect(waldb: WalDatabase) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(waldb.url, autocommit=True)


async def test_one_claim_holds_the_slot_and_the_next_waits_for_it(waldb: WalDatabase) -> None:
    first, second = SlotClaim(waldb.url, waldb.slot), SlotClaim(waldb.url, waldb.slot)
    async with await connect(waldb) as conn_a, await connect(waldb) as conn_b:
        await asyncio.wait_for(first.campaign(conn_a), TIMEOUT)
        waiting = asyncio.ensure_future(second.campaign(conn_b))
        await asyncio.sleep(1.5)  # past one retry of the campaign
        assert not waiting.done()
        await conn_a.close()  # the holder's session ends: the lock passes on
        await asyncio.wait_for(waiting, TIMEOUT)
        async with second.read(conn_b) as transport:
            row = waldb.insert("s", "after the handover")
            batch = await asyncio.wait_for(transport.next(), TIMEOUT)
            assert [item.id for item in batch if isinstance(item, Message)] == [row]
            await transport.confirm()
            assert second.reading is transport and transport.lag_seconds() == 0.0
        assert second.reading is None


async def test_the_lock_holder_ends_a_stale_reader_and_reads(waldb: WalDatabase) -> None:
    """A reader that lost the lock (here: never had it) but still streams is ended."""
    claim = SlotClaim(waldb.url, waldb.slot)
    async with (
        SlotStream(waldb.url, waldb.slot, prefixes=PREFIXES, application_name=READER_NAME),
        await connect(waldb) as conn,
    ):
        await claim.campaign(conn)
        async with claim.read(conn) as transport:
            row = waldb.insert("s", "read by the new holder")
            batch = await asyncio.wait_for(transport.next(), TIMEOUT)
            assert ids(batch) == [row]
    assert claim.takeovers == 1


async def test_another_sessions_use_of_the_slot_is_waited_out_not_ended(
    waldb: WalDatabase,
) -> None:
    """A stream of another name (a peek, a tool) is not a stale pgsse reader: not ended."""
    claim = SlotClaim(waldb.url, waldb.slot)
    async with await connect(waldb) as conn:
        await claim.campaign(conn)
        other = SlotStream(waldb.url, waldb.slot, application_name="someone-else")
        await other.__aenter__()
        context = claim.read(conn)  # held: a dropped context manager closes its generator
        reading = asyncio.ensure_future(context.__aenter__())
        await asyncio.sleep(1.0)
        assert not reading.done() and claim.takeovers == 0
        await other.__aexit__(None, None, None)
        transport = await asyncio.wait_for(reading, TIMEOUT)
        assert claim.reading is transport
        await context.__aexit__(None, None, None)


async def test_an_invalidated_slot_is_made_again_and_flagged_for_backfill(
    database: Database, waldb: WalDatabase
) -> None:
    waldb.insert("s", "before")
    invalidate_slots(database)
    claim = SlotClaim(waldb.url, waldb.slot)
    async with await connect(waldb) as conn:
        await claim.campaign(conn)
        async with claim.read(conn) as transport:
            assert claim.recreated and claim.invalidations == 1
            row = waldb.insert("s", "after")
            batch = await asyncio.wait_for(transport.next(), TIMEOUT)
            assert ids(batch) == [row]
    with waldb.connect() as check:
        status = check.execute(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (waldb.slot,)
        ).fetchone()
    assert status is not None and status[0] != "lost"


async def test_confirm_waits_for_the_batch_to_be_handed_on(waldb: WalDatabase) -> None:
    """`before_confirm` runs first (the relay waits for Redis there): a failure in it leaves
    the slot where it was, so the next reader gets the batch again."""
    handed = asyncio.Event()

    async def never_handed() -> None:
        await handed.wait()

    claim = SlotClaim(waldb.url, waldb.slot)
    row = waldb.insert("s", "not handed on")
    async with await connect(waldb) as conn:
        await claim.campaign(conn)
        async with claim.read(conn, never_handed) as transport:
            assert ids(await asyncio.wait_for(transport.next(), TIMEOUT)) == [row]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(transport.confirm(), 0.5)
    again = SlotClaim(waldb.url, waldb.slot)
    async with await connect(waldb) as conn:
        await again.campaign(conn)
        async with again.read(conn) as transport:
            assert ids(await asyncio.wait_for(transport.next(), TIMEOUT)) == [row]


async def test_batches_come_at_most_one_per_interval(waldb: WalDatabase) -> None:
    """A visibility query per batch cost the writers 12-18% of their rate in the bench: under
    load the batches are handed out at least `BATCH_INTERVAL_SECONDS` apart, what arrives
    meanwhile joining the next one; nothing is lost or reordered by the wait."""
    insert = "INSERT INTO messages (session_id, content) VALUES ('s', 'x') RETURNING id"
    with waldb.connect() as writer:  # open beforehand: each insert a millisecond or two

        def row() -> int:
            found = writer.execute(insert).fetchone()
            assert found is not None
            return int(found[0])

        claim = SlotClaim(waldb.url, waldb.slot)
        async with await connect(waldb) as conn:
            await claim.campaign(conn)
            async with claim.read(conn) as transport:
                first = row()
                assert ids(await asyncio.wait_for(transport.next(), TIMEOUT)) == [first]
                taken = time.monotonic()
                await transport.confirm()
                rest = [row() for _ in range(3)]
                got: list[int] = []
                while len(got) < len(rest):
                    got += ids(await asyncio.wait_for(transport.next(), TIMEOUT))
                    assert time.monotonic() - taken >= BATCH_INTERVAL_SECONDS * 0.99
                    taken = time.monotonic()
                    await transport.confirm()
                assert got == rest


async def test_the_monitor_samples_lag_and_reader(waldb: WalDatabase) -> None:
    monitor = CaptureMonitor(waldb.url, waldb.slot)
    task = asyncio.ensure_future(monitor.run())
    try:
        await sampled(lambda: monitor.lag is not None)
        assert monitor.lag is not None and not monitor.reader_active
        assert monitor.lag.bytes >= 0 and monitor.lag.seconds is not None
    finally:
        task.cancel()
    missing = CaptureMonitor(waldb.url, "no_such_slot")
    task = asyncio.ensure_future(missing.run())
    try:
        await sampled(lambda: missing.error is not None)
        assert missing.lag is None and "no capture slot" in (missing.error or "")
    finally:
        task.cancel()


async def test_the_monitor_sees_a_new_reader_within_a_fraction_of_a_second(
    waldb: WalDatabase,
) -> None:
    """A follower is ready again only once the monitor sees the slot read (service.ready):
    while no reader holds it, the monitor samples every `MONITOR_WAITING_SECONDS`. With a
    one-second period, a reader that started just after a sample was seen a second later
    (the wal soak: every broker ready 1.05 s after PostgreSQL returned, over its limit)."""
    monitor = CaptureMonitor(waldb.url, waldb.slot)
    task = asyncio.ensure_future(monitor.run())
    try:
        await sampled(lambda: monitor.lag is not None)
        first = monitor.lag
        await sampled(lambda: monitor.lag is not first)  # a sample just now
        claim = SlotClaim(waldb.url, waldb.slot)
        async with await connect(waldb) as conn:
            await claim.campaign(conn)
            async with claim.read(conn):
                started = time.monotonic()
                await sampled(lambda: monitor.reader_active)
                seen = time.monotonic() - started
        assert seen < 0.5, seen
    finally:
        task.cancel()


async def test_a_batch_waits_until_its_transactions_are_visible(waldb: WalDatabase) -> None:
    """The walsender sends a commit a moment before other sessions see it: a row routed then
    was missing from a resume's read by id (the wal soak lost one so) and a large row's
    reference read found nothing (134). `next()` waits while a transaction of the batch is
    in progress in a fresh snapshot; `in_progress` is that check."""
    claim = SlotClaim(waldb.url, waldb.slot)
    async with await connect(waldb) as conn:
        await claim.campaign(conn)
        async with claim.read(conn) as transport:
            with waldb.connect() as writer:
                writer.autocommit = False
                writer.execute("INSERT INTO messages (session_id, content) VALUES ('s', 'x')")
                found = writer.execute(
                    "SELECT pg_current_xact_id()::text::bigint % 4294967296"
                ).fetchone()
                assert found is not None
                xid = int(found[0])
                assert await transport.in_progress([xid])
                writer.commit()
            assert not await transport.in_progress([xid])
            batch = await asyncio.wait_for(transport.next(), TIMEOUT)
            assert len(batch) == 1
            assert transport.lag_seconds() >= 0.0


async def test_a_held_slot_moves_while_idle_only_as_far_as_released(
    database: Database, waldb: WalDatabase
) -> None:
    """`read(held=True)` (the relay): the server's keepalives past others' WAL do not move the
    slot beyond what `release` allowed (the bus's mark), though `idle_end` follows them."""
    claim = SlotClaim(waldb.url, waldb.slot)
    row = waldb.insert("s", "handed on")
    async with await connect(waldb) as conn:
        await claim.campaign(conn)
        async with claim.read(conn, held=True) as transport:
            assert ids(await asyncio.wait_for(transport.next(), TIMEOUT)) == [row]
            handed = transport.position
            assert handed is not None
            await transport.confirm()
            for _ in range(int(TIMEOUT / 0.05)):  # WAL of another database, until a keepalive
                with database.connect() as other:
                    other.execute("SELECT pg_logical_emit_message(false, 'other', 'x')")
                if transport.idle_end > handed:
                    break
                await asyncio.sleep(0.05)
            assert transport.idle_end > handed
            assert (await claim.confirmed(conn) or 0) <= handed  # moved by the confirm only
            transport.release(handed + 1)
    async with await connect(waldb) as conn:
        assert (await claim.confirmed(conn) or 0) <= handed + 1  # no further, even at the end
