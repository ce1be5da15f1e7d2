"""The bus (bus.py) and the relay's election (relay.py), in process, on real Redis and PostgreSQL.

End-to-end tests over broker processes are in test_bus.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from broker.bus import Bus, BusDown, BusReader
from broker.events import Message
from broker.hub import Hub
from broker.relay import LOCK_CLASS, Appender, Relay
from broker.store import Store
from tests.conftest import Database
from tests.support.redis import RedisServer


def message(id_: int, session: str = "a") -> Message:
    return Message(id_, session, None, f"m{id_}", False, True, None, "2026-01-01T00:00:00.000Z")


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def bus(redis: RedisServer) -> AsyncIterator[Bus]:
    bus = Bus(redis.url, f"test:{uuid.uuid4().hex[:8]}", maxlen=1_000)
    yield bus
    await bus.close()


async def running(run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    return asyncio.ensure_future(run())


def relay_locks(database: Database, bus: Bus) -> int:
    """Advisory locks granted on `bus`'s key: how many relays hold the role."""
    rows = database.query(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = %s AND objid = hashtext(%s)::oid",
        (LOCK_CLASS, bus.key),
    )
    return int(rows[0][0])


async def stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.print_stack()
    assert not pending, "a task did not end within 10 s of its cancellation"


async def test_entries_round_trip_in_append_order_and_the_stream_is_trimmed(bus: Bus) -> None:
    for i in (5, 3, 4):  # out of id order, as commits can be
        await bus.append(message(i))
    entries = await bus.tail()
    assert [e.message.id for e in entries] == [5, 3, 4]
    assert entries[0].message == message(5)
    assert [e.message.id for e in await bus.read(entries[0].stream_id, block_ms=10)] == [3, 4]
    for i in range(100, 3_100):
        await bus.append(message(i))
    kept = len(await bus.tail(count=10_000))
    assert 1_000 <= kept < 1_500, kept  # MAXLEN ~: about maxlen, trimmed by whole nodes


async def test_a_reader_preloads_its_journal_then_routes_new_rows_once(bus: Bus) -> None:
    for i in (1, 3, 2):
        await bus.append(message(i))
    hub = Hub(max_subscribers=10, queue_size=100)
    reader = BusReader(bus, hub)
    task = await running(reader.run)
    try:
        await eventually(lambda: reader.connected, 10, "reader up")
        assert hub.journal.after(1, None, None) == [3, 2]  # resume is exact in stream order
        subscriber = hub.subscribe(None, None)
        for i in (5, 4, 4):  # 4 twice: a relay that died after XADD, say
            await bus.append(message(i))
        await eventually(lambda: subscriber.queued >= 2, 10, "two rows routed")
        await asyncio.sleep(0.2)  # a third (the duplicate) would be routed by now
        assert [event.id for event in subscriber.take()] == [5, 4]
        assert hub.journal.after(3, None, None) == [2, 5, 4]
        assert reader.lag_ms < 5_000
    finally:
        await stop(task)


async def test_one_relay_is_elected_and_the_next_backfills_what_the_stream_lacks(
    bus: Bus, database: Database, session_id: str
) -> None:
    async with Store.open(database.url) as store:
        relays = [Relay(database.url, bus, store, lambda: None) for _ in range(2)]
        tasks = [await running(relay.run) for relay in relays]
        try:
            await eventually(lambda: any(r.role == "relay" for r in relays), 10, "a relay")
            await asyncio.sleep(2.5)  # two campaign rounds: the other must stay a follower
            assert sorted(r.role for r in relays) == ["follower", "relay"]
            first = next(i for i, r in enumerate(relays) if r.role == "relay")
            assert relay_locks(database, bus) == 1
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
            assert relay_locks(database, bus) == 1
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
