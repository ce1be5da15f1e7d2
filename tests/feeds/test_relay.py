"""broker.feeds.relay in process, on real PostgreSQL and Redis: the election, the backfill of
what the stream lacks, stepping down when its backend dies, the Appender's batches, and the
wal takeover that needs no backfill (the WAL mark).

End to end tests over broker processes are in tests/system/test_bus.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import psycopg
import pytest

from broker.feeds.bus import Bus, BusDown
from broker.feeds.relay import (
    CAMPAIGN_SECONDS,
    CANDIDATE_NAME,
    LOCK_CLASS,
    TAKEOVER_GRACE_SECONDS,
    Appender,
    Relay,
    lock_name,
)
from broker.feeds.walcapture import SlotClaim
from broker.slots import PUBLICATION
from broker.store import Store
from tests.support.database import Database, invalidate_slots
from tests.support.inprocess import eventually, message, stop
from tests.support.redis import RedisServer
from tests.support.wal import WalDatabase


async def relay_locks(database: Database, bus: Bus) -> int:
    """Advisory locks granted on `bus`'s lock: how many relays hold the role."""
    rows = database.query(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = %s AND objid = hashtext(%s)::oid",
        (LOCK_CLASS, lock_name(bus.key, await bus.identity())),
    )
    return int(rows[0][0])


async def test_one_relay_is_elected_and_the_next_backfills_what_the_stream_lacks(
    bus: Bus, database: Database, session_id: str
) -> None:
    async with Store.open(database.url) as store:
        relays = [Relay(database.url, bus, store, lambda: None) for _ in range(2)]
        tasks = [asyncio.ensure_future(relay.run()) for relay in relays]
        try:
            await eventually(lambda: any(r.role == "relay" for r in relays), 10, "a relay")
            await asyncio.sleep(2.5)  # two campaign rounds: the other must stay a follower
            assert sorted(r.role for r in relays) == ["follower", "relay"]
            first = next(i for i, r in enumerate(relays) if r.role == "relay")
            assert await relay_locks(database, bus) == 1
            database.insert(session_id, "live")
            await eventually(lambda: relays[first].appended == 1, 10, "the row appended")

            await stop(tasks[first])  # its connection closes: lock and LISTEN go with it
            gap = [database.insert(session_id, f"gap {i}") for i in range(3)]
            other = relays[1 - first]
            started = time.monotonic()
            await eventually(lambda: other.role == "relay", 10, "the follower takes over")
            assert time.monotonic() - started < 5
            await eventually(lambda: other.backfilled == 3, 10, "the gap backfilled")
            after = database.insert(session_id, "after")
            await eventually(lambda: other.appended == 4, 10, "the next row appended")
            rows = [e.message.id for e in await bus.tail() if e.message.session_id == session_id]
            assert rows[1:] == [*gap, after]
            assert await relay_locks(database, bus) == 1
        finally:
            await stop(*tasks)


async def test_the_appender_pipelines_rows_in_order_and_reports_a_failure_once(
    bus: Bus, redis: RedisServer
) -> None:
    batches: list[int] = []
    failures: list[BusDown] = []
    appender = Appender(bus, failures.append, batches.append)
    for i in range(1, 201):
        appender.put(message(i))
    await eventually(lambda: sum(batches) == 200, 10, "every row appended")
    assert [e.message.id for e in await bus.tail()] == list(range(1, 201))  # in order
    assert len(batches) < 200  # rows that queued during a round trip shared the next one
    redis.stop()
    appender.put(message(201))
    await eventually(lambda: len(failures) == 1, 10, "the failure reported")
    with pytest.raises(BusDown):
        appender.put(message(202))
    assert len(failures) == 1
    appender.close()


async def test_only_the_leases_holder_writes_a_wal_mark_and_a_refused_one_fails_the_appender(
    bus: Bus,
) -> None:
    """A relay frozen past its lease that wakes mid-drain must not mark the stream while a new
    relay backfills it: the mark is written only while the writer's token holds the lease."""
    marked: list[int] = []
    failures: list[BusDown] = []
    async with bus.lease("new-relay"):
        assert await bus.set_wal_mark(100, "new-relay")
        assert not await bus.set_wal_mark(200, "woke-up")
        assert await bus.wal_mark() == 100
        stale = Appender(bus, failures.append, lambda _: None, 100, marked.append, "woke-up")
        stale.put(message(1))
        stale.mark(300)
        with pytest.raises(BusDown, match="lease lost"):
            await stale.drained()
        assert failures and not marked and await bus.wal_mark() == 100
        live = Appender(bus, failures.append, lambda _: None, 100, marked.append, "new-relay")
        live.mark(400)
        await live.drained()
        assert marked == [400] and await bus.wal_mark() == 400
    assert await bus.set_wal_mark(None, "anyone") and await bus.wal_mark() is None


async def test_a_relay_whose_backend_is_terminated_steps_down_and_is_elected_again(
    bus: Bus, database: Database, session_id: str
) -> None:
    """Losing the connection loses the lock and the LISTEN together; the next campaign wins
    them back and appends the row committed meanwhile, once."""
    async with Store.open(database.url) as store:
        relay = Relay(database.url, bus, store, lambda: None)
        task = asyncio.ensure_future(relay.run())
        try:
            await eventually(lambda: relay.listening, 10, "elected")
            first = database.insert(session_id, "first")
            await eventually(lambda: relay.appended == 1, 10, "the row appended")
            assert database.terminate_listeners() == 1  # as pgsse-listener once elected
            meanwhile = database.insert(session_id, "meanwhile")
            await eventually(lambda: relay.elections == 2, 10, "elected again")
            after = database.insert(session_id, "after")
            await eventually(lambda: relay.appended == 3, 10, "every row appended")
            rows = [e.message.id for e in await bus.tail() if e.message.session_id == session_id]
            assert rows == [first, meanwhile, after]
            assert await relay_locks(database, bus) == 1 and relay.listening
        finally:
            await stop(task)


async def test_a_follower_sees_a_just_elected_relays_lease_at_once_and_leaves_it_be(
    bus: Bus, database: Database
) -> None:
    """The lock held and no lease yet (a relay elected a moment ago): the follower asks again
    every `CAMPAIGN_WAITING_SECONDS`, so it is ready as soon as the lease is there (it waited
    a whole `CAMPAIGN_SECONDS` before: the wal soak's 1.17 s back), and it does not end the
    holder's backend before `TAKEOVER_GRACE_SECONDS`."""
    name = lock_name(bus.key, await bus.identity())
    async with (
        await psycopg.AsyncConnection.connect(database.url, autocommit=True) as holder,
        Store.open(database.url) as store,
    ):
        await holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, name))
        follower = Relay(database.url, bus, store, lambda: None)
        task = asyncio.ensure_future(follower.run())
        try:
            await eventually(lambda: campaign_polled(database), 10, "the follower's first poll")
            # Gone for a few of its polls, not for the grace: a poll-counting rule would end it.
            await asyncio.sleep(TAKEOVER_GRACE_SECONDS / 5)
            async with bus.lease("just-elected"):
                started = time.monotonic()
                await eventually(lambda: follower.lease_live, 10, "the lease seen")
                assert time.monotonic() - started < CAMPAIGN_SECONDS * 0.4
            assert follower.takeovers == 0 and follower.role == "follower"
            await holder.execute("SELECT 1")  # its backend was left alone
        finally:
            await stop(task)


def campaign_polled(database: Database) -> bool:
    """Whether a follower's campaign connection asked for the lock at least once."""
    rows = database.query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        " AND query LIKE 'SELECT pg_try_advisory_lock%%'",
        (CANDIDATE_NAME,),
    )
    return int(rows[0][0]) > 0


async def session_rows(bus: Bus, session_id: str) -> list[int]:
    return [e.message.id for e in await bus.tail() if e.message.session_id == session_id]


async def wal_relay_up(
    waldb: WalDatabase, bus: Bus, store: Store
) -> tuple[Relay, asyncio.Task[None]]:
    relay = Relay(waldb.url, bus, store, lambda: None, claim=SlotClaim(waldb.url, waldb.slot))
    task = asyncio.ensure_future(relay.run())
    await eventually(lambda: relay.role == "relay", 10, "elected")
    return relay, task


async def test_a_wal_takeover_with_slot_and_stream_intact_reads_neither_table_nor_stream(
    bus: Bus, waldb: WalDatabase, session_id: str
) -> None:
    """The first relay scans (no WAL mark yet); the next, after a stop with rows committed
    while no relay read the slot, takes the role without a scan: the slot brings them, each
    once, after the rows the stream held; the byte budget learns the stream's sizes."""
    async with Store.open(waldb.url) as store:
        first, task = await wal_relay_up(waldb, bus, store)
        await eventually(lambda: first.scan == "no_wal_mark", 10, "the first relay's scan")
        before = [waldb.insert(session_id, f"before {i}") for i in range(3)]
        await eventually(lambda: first.appended == 3, 10, "the rows appended")
        await stop(task)
        gap = [waldb.insert(session_id, f"gap {i}") for i in range(3)]
        mark = await bus.wal_mark()
        assert mark is not None and await slot_confirmed(waldb) <= mark  # held to the mark

        second, task = await wal_relay_up(waldb, bus, store)
        try:
            after = waldb.insert(session_id, "after")
            await eventually(lambda: second.appended == 4, 10, "the gap and the next row")
            assert second.scan is None and second.backfilled == 0
            assert await session_rows(bus, session_id) == [*before, *gap, after]  # each once
            sizes = [size async for page in bus.pages() for _, size in page]
            await eventually(lambda: bus.sizes.total == sum(sizes), 10, "the stream's sizes")
            assert (await bus.wal_mark() or 0) > mark  # moved on
        finally:
            await stop(task)


def consume_the_slot(database: Database, waldb: WalDatabase) -> None:
    """Another reader (a broker without the bus, say) reads and confirms the slot."""
    with waldb.connect() as conn:
        conn.execute(
            "SELECT count(*) FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
            (waldb.slot, PUBLICATION),
        )


def invalidate_the_slot(database: Database, waldb: WalDatabase) -> None:
    """PostgreSQL invalidates the slot: the next relay makes it again, starting after now."""
    invalidate_slots(database)


@pytest.mark.parametrize(
    ("disturb", "reason"),
    [(consume_the_slot, "slot_past_mark"), (invalidate_the_slot, "slot_recreated")],
)
async def test_a_wal_takeover_scans_when_the_slot_no_longer_holds_the_gap(
    bus: Bus,
    database: Database,
    waldb: WalDatabase,
    session_id: str,
    disturb: Callable[[Database, WalDatabase], None],
    reason: str,
) -> None:
    """Rows committed while no relay read the slot, then the slot moved past the bus's mark
    or made again: it no longer brings them, so the next relay scans the table and appends
    them once."""
    async with Store.open(waldb.url) as store:
        first, task = await wal_relay_up(waldb, bus, store)
        held = waldb.insert(session_id, "held")
        await eventually(lambda: first.appended == 1, 10, "the row appended")
        await stop(task)
        gap = [waldb.insert(session_id, f"gap {i}") for i in range(3)]
        disturb(database, waldb)
        second, task = await wal_relay_up(waldb, bus, store)
        try:
            await eventually(lambda: second.backfilled == 3, 10, "the gap backfilled")
            assert second.scan == reason
            after = waldb.insert(session_id, "after")
            await eventually(lambda: second.appended == 4, 10, "the next row appended")
            assert await session_rows(bus, session_id) == [held, *gap, after]
        finally:
            await stop(task)


async def slot_confirmed(waldb: WalDatabase) -> int:
    async with await waldb.reader_connection() as conn:
        confirmed = await SlotClaim(waldb.url, waldb.slot).confirmed(conn)
    assert confirmed is not None
    return confirmed
