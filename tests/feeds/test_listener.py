"""broker.feeds.listener in process, on the real cluster: rows reach the hub, large rows are read
by reference, a bad payload is skipped, and after its backend is terminated the listener
comes back and backfills what committed meanwhile, once and in order. The end to end faults
(restarts, proxies cut, brokers killed) are test_recovery's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from broker.config.feeds import load
from broker.feeds.listener import CHANNEL, Listener
from broker.feedset import FeedSet
from broker.hub import Hub
from broker.store import Store
from tests.support.database import Database
from tests.support.feeds import ORDERS_CONFIG, ORDERS_TABLE, migrated
from tests.support.inprocess import eventually, received, stop
from tests.support.pgproxy import PostgresProxy


@dataclass
class Running:
    listener: Listener
    hub: Hub


async def start(url: str, store: Store) -> tuple[Running, asyncio.Task[None]]:
    hub = Hub(max_subscribers=10, queue_size=100)
    listener = Listener(url, hub, store)
    task = asyncio.ensure_future(listener.run())
    await asyncio.wait_for(listener.started.wait(), 10)
    return Running(listener, hub), task


@pytest.fixture
async def running(database: Database) -> AsyncIterator[Running]:
    async with Store.open(database.url) as store:
        running, task = await start(database.url, store)
        yield running
        await stop(task)


async def test_a_row_inserted_reaches_a_subscriber_of_its_session(
    running: Running, database: Database, session_id: str
) -> None:
    subscriber = running.hub.subscribe(session_id, None)
    everyone = running.hub.subscribe(None, None)
    database.insert("elsewhere")
    row = database.insert(session_id, "hello")
    assert await received(subscriber, 1) == [row]
    assert (await received(everyone, 2))[-1] == row
    assert running.listener.connected and running.listener.notifications >= 2


async def test_a_row_too_large_for_notify_is_read_by_its_id(
    running: Running, database: Database, session_id: str
) -> None:
    subscriber = running.hub.subscribe(session_id, None)
    content = "长" * 10_000  # 30,000 bytes; NOTIFY takes 8,000: the trigger sends a reference
    row = database.insert(session_id, content)
    await asyncio.wait_for(subscriber.wait(), 10)
    (event,) = subscriber.take()
    data = event.data.decode().split("data: ", 1)[1]
    assert event.id == row and json.loads(data)["data"]["content"] == content


async def test_a_malformed_notification_is_skipped_and_the_next_row_delivered(
    running: Running, database: Database, session_id: str
) -> None:
    subscriber = running.hub.subscribe(session_id, None)
    before = running.listener.notifications
    database.query("SELECT pg_notify(%s, %s)", (CHANNEL, "{not json"))
    row = database.insert(session_id, "after")
    assert await received(subscriber, 1) == [row]
    assert running.listener.notifications == before + 2 and running.listener.connected


async def test_after_its_backend_is_terminated_it_reconnects_and_backfills_once_in_order(
    database: Database, pgproxy: PostgresProxy, session_id: str
) -> None:
    """The proxy keeps the listener out after the kill, so the rows surely commit while it
    is down and only the backfill can bring them."""
    async with Store.open(database.url) as store:
        running, task = await start(pgproxy.url, store)
        try:
            listener = running.listener
            subscriber = running.hub.subscribe(session_id, None)
            first = database.insert(session_id, "first")
            assert await received(subscriber, 1) == [first]

            pgproxy.listener_blocked.set()
            assert database.terminate_listeners() == 1
            await eventually(lambda: not listener.connected, 10, "the listener down")
            meanwhile = [database.insert(session_id, f"gap {i}") for i in range(3)]
            await eventually(lambda: pgproxy.refused >= 1, 10, "a reconnect refused")
            pgproxy.listener_blocked.clear()

            assert await received(subscriber, 3) == meanwhile
            assert listener.connected and listener.reconnects == 1
            assert listener.backfilled == 3
            after = database.insert(session_id, "after")
            assert await received(subscriber, 1) == [after]
            assert subscriber.queued == 0
        finally:
            await stop(task)


async def test_changes_committed_while_it_is_down_are_backfilled_once_in_order(
    database: Database, pgproxy: PostgresProxy, tmp_path: Path
) -> None:
    """As rows: changes of a declared feed committed while the listener is kept out come
    from the change log when it is back, once each, before live ones."""
    with migrated(database, tmp_path, ORDERS_TABLE, ORDERS_CONFIG) as (scratch, config):
        with psycopg.connect(scratch.url) as conn:
            declared = load(conn, config)
        through_proxy = pgproxy.to(scratch.url)
        hub = Hub(max_subscribers=10, queue_size=100)
        feeds = FeedSet(hub, declared)
        orders = feeds.get("orders")
        assert orders is not None
        async with Store.open(scratch.url) as store:
            listener = Listener(through_proxy, hub, store, feeds.route, feeds, ["orders"])
            task = asyncio.ensure_future(listener.run())
            try:
                await asyncio.wait_for(listener.started.wait(), 10)
                stream = orders.subscribe(("42",), {})
                insert = "INSERT INTO shop.orders (customer_id, status) VALUES ('42', 'open')"
                scratch.execute(insert)
                [first] = await received(stream, 1)

                pgproxy.listener_blocked.set()
                scratch.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'pgsse-listener' AND datname = current_database()"
                )
                await eventually(lambda: not listener.connected, 10, "the listener down")
                scratch.execute(insert)
                scratch.execute("UPDATE shop.orders SET status = 'paid'")
                scratch.execute("DELETE FROM shop.orders WHERE id = 1")
                await eventually(lambda: pgproxy.refused >= 1, 10, "a reconnect refused")
                pgproxy.listener_blocked.clear()

                meanwhile = await received(stream, 4)  # insert, 2 updates, delete
                assert meanwhile == sorted(meanwhile) and meanwhile[0] > first
                assert orders.counters.messages_routed == 5
                scratch.execute(insert)
                assert len(await received(stream, 1)) == 1
                assert stream.queued == 0
            finally:
                await stop(task)
