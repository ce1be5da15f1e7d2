"""`BROKER_CAPTURE=wal` in broker processes: one reader per database, its replacement after a
kill -9, readiness, the slot's lag in stats and `/metrics`, an invalidated slot recovered.

The delivery, resume and recovery tests run in both modes (`pytest.mark.captures` in
test_resume.py, test_recovery.py, test_bus.py); these are what the wal mode has of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from broker.database import migrate
from tests.support.database import Database, invalidate_slots, stored_ids
from tests.support.feeds import ORDERS_TABLE, scratch_database, write_config
from tests.support.pgproxy import PostgresProxy
from tests.support.processes import BrokerProcess
from tests.support.redis import RedisServer, on_bus, the_relay
from tests.support.sse import SSEClient, connected, subscribe
from tests.support.writers import Writer

REPLACED_WITHIN = 5.0  # seconds from a reader's kill -9 to another broker reading


@pytest.fixture
def capture() -> str:
    return "wal"


def scrape(broker: BrokerProcess) -> str:
    with urllib.request.urlopen(broker.base_url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


def slot_state(database: Database) -> tuple[str | None, int | None]:
    rows = database.query(
        "SELECT wal_status, active_pid FROM pg_replication_slots WHERE slot_name = %s",
        (database.slot,),
    )
    return (rows[0][0], rows[0][1]) if rows else (None, None)


async def read_ids(client: SSEClient, last: int, timeout: float = 20.0) -> list[int]:
    events = await client.events_until(lambda e: e.id is not None and int(e.id) >= last, timeout)
    return [int(e.id) for e in events if e.id is not None and e.type == "message"]


async def killed_while_writing(
    reader: BrokerProcess,
    next_reader: BrokerProcess,
    reading: Callable[[], bool],
    database: Database,
    session_id: str,
) -> float:
    """`reader` killed with -9 while a writer commits 100 rows/s; the seconds until
    `next_reader` is `reading`. The writer stops once rows committed after the takeover."""
    writer = Writer(database, session_id, rate=100)
    writer.start()
    reader.wait_until(lambda: writer.committed > 30, 10, "rows written")
    reader.signal(signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.to_thread(next_reader.wait_until, reading, 15, "the next reader reading")
    replaced = time.monotonic() - killed
    next_reader.wait_until(lambda: writer.committed > 200, 10, "rows after the takeover")
    writer.stop()
    return replaced


async def test_one_reader_per_database_and_a_killed_one_is_replaced_within_5s(
    start_broker: Callable[..., BrokerProcess], database: Database, session_id: str
) -> None:
    """Without a bus the broker that takes the slot reads; a second is not ready (its stats
    say another session reads) until the first dies, then reads from where it confirmed."""
    first = start_broker()
    second = start_broker(wait_ready=False)
    client = await subscribe(first, sessionId=session_id)
    early = database.insert(session_id, "early")
    assert (await client.message()).id == str(early)
    await asyncio.sleep(2)  # two campaigns of the second: it stays out
    assert second.get("/readyz")[0] == 503
    assert second.stats()["capture"]["reader"] == "other"
    stats = first.stats()["capture"]
    assert stats["mode"] == "wal" and stats["reader"] == "self"
    assert isinstance(stats["lagBytes"], int) and stats["lagSeconds"] is not None
    metrics = scrape(first)
    assert "pgsse_capture_reader 1.0" in metrics
    assert "pgsse_capture_slot_lag_bytes " in metrics
    assert "pgsse_capture_slot_lag_seconds " in metrics

    replaced = await killed_while_writing(first, second, second.ready, database, session_id)
    print(f"\nreader replaced {replaced:.2f}s after kill -9")
    assert replaced < REPLACED_WITHIN
    expected = stored_ids(database, session_id)
    resumed = await SSEClient.open(
        second.port, params={"sessionId": session_id}, headers={"Last-Event-ID": str(early)}
    )
    assert await read_ids(resumed, expected[-1]) == expected[1:]
    assert second.stats()["capture"]["reader"] == "self"


async def test_an_invalidated_slot_is_one_log_line_and_recovered_from_the_table(
    start_broker: Callable[..., BrokerProcess],
    pgproxy: PostgresProxy,
    database: Database,
    session_id: str,
) -> None:
    """The reader is kept out while PostgreSQL invalidates the slot (max_slot_wal_keep_size
    exceeded): when it is back, it says so once, makes the slot again and backfills the rows
    the lost WAL held from the table, each once, in order."""
    broker = start_broker(DATABASE_URL=pgproxy.url)
    client = await subscribe(broker, sessionId=session_id)
    before = database.insert(session_id, "before")
    assert (await client.message()).id == str(before)
    pgproxy.listener_blocked.set()
    await asyncio.to_thread(database.terminate_listeners)
    await asyncio.to_thread(broker.wait_until, lambda: not broker.ready(), 10, "reader down")
    lost = [database.insert(session_id, f"lost {n}") for n in range(5)]
    invalidate_slots(database)
    assert slot_state(database)[0] == "lost"
    pgproxy.listener_blocked.clear()
    await asyncio.to_thread(broker.wait_until, broker.ready, 20, "reader back")
    after = database.insert(session_id, "after")
    assert await read_ids(client, after) == [*lost, after]
    events = [e for e in broker.log_events() if e.get("event") == "capture_slot_invalidated"]
    assert len(events) == 1 and events[0]["level"] == "error"
    assert "max_slot_wal_keep_size" in events[0]["error"]
    assert slot_state(database)[0] in ("reserved", "extended")
    assert broker.stats()["listener"]["backfilled"] >= len(lost)


async def test_connections_cut_without_a_word_lose_nothing_and_the_broker_lives_on(
    start_broker: Callable[..., BrokerProcess],
    pgproxy: PostgresProxy,
    database: Database,
    session_id: str,
) -> None:
    """Every connection of the broker cut at the proxy, five times while a writer commits 200
    rows/s: the slot's stream ends with no error message, and libpq closes its socket as it
    reads the end. The broker (uvloop) reads again each time and every row arrives once, in
    order. In CI it died with SIGABRT instead: a reader was left on the closed socket's
    number, and libuv aborts when the kernel no longer knows a descriptor it watches."""
    broker = start_broker(DATABASE_URL=pgproxy.url)
    client = await subscribe(broker, sessionId=session_id)
    writer = Writer(database, session_id, rate=200)
    writer.start()

    def reading_again(cuts: int) -> bool:
        return broker.ready() and broker.stats()["listener"]["reconnects"] >= cuts

    for cut in range(1, 6):
        more = writer.committed + 30
        broker.wait_until(lambda more=more: writer.committed > more, 10, "rows written")
        assert pgproxy.cut() >= 1
        broker.wait_until(lambda cut=cut: reading_again(cut), 15, f"reading again after cut {cut}")
    writer.stop()
    expected = stored_ids(database, session_id)
    assert await read_ids(client, expected[-1]) == expected
    assert broker.process is not None and broker.process.poll() is None


@pytest.fixture
def fresh_database(database: Database) -> Iterator[Database]:
    """A new database of the cluster, not migrated; dropped (with its slot) afterwards: ask
    for it before `start_broker`, whose brokers then stop first."""
    name = f"wal_{uuid.uuid4().hex[:10]}"
    with database.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    fresh = database.sibling(name, capture="wal", slot=f"slot_{name}")
    yield fresh
    with database.connect() as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s AND active_pid IS NULL",
            (fresh.slot,),
        )
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def test_serve_with_wal_migrates_and_delivers(
    fresh_database: Database, start_broker: Callable[..., BrokerProcess], session_id: str
) -> None:
    """As `BROKER_CAPTURE=wal make run`: serve's migration makes the slot and the publication,
    and drops the messages trigger."""
    broker = start_broker(
        DATABASE_URL=fresh_database.url, BROKER_MIGRATE="true", **fresh_database.broker_env()
    )
    client = await subscribe(broker, sessionId=session_id)
    row = fresh_database.insert(session_id, "first")
    assert (await client.message()).id == str(row)
    assert slot_state(fresh_database)[1] is not None  # read by the broker
    with psycopg.connect(fresh_database.url) as conn:
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'messages'::regclass"
            " AND NOT tgisinternal"
        ).fetchone()
    assert triggers == (0,)  # the rows come from the WAL itself


async def test_on_the_bus_the_relay_reads_the_slot_and_a_killed_one_is_replaced(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [on_bus(start_broker, redis, stream) for _ in range(2)]
    relay = the_relay(brokers)
    follower = next(b for b in brokers if b is not relay)
    assert relay.stats()["capture"]["reader"] == "self"
    follower.wait_until(lambda: follower.stats()["capture"]["reader"] == "other", 5, "sampled")
    client = await SSEClient.open(follower.port, params={"sessionId": session_id})
    await connected(client)
    replaced = await killed_while_writing(
        relay,
        follower,
        lambda: follower.stats()["capture"]["reader"] == "self",
        database,
        session_id,
    )
    print(f"\nrelay and reader replaced {replaced:.2f}s after kill -9")
    assert replaced < REPLACED_WITHIN
    expected = stored_ids(database, session_id)
    assert await read_ids(client, expected[-1]) == expected


ORDERS = """
[feeds.orders]
table = "shop.orders"
key = "customer_id"
filters = ["status"]
columns = ["id", "customer_id", "status"]
events = ["insert", "update", "delete"]
"""


async def test_a_feeds_changes_travel_the_slot_signed_as_notifications_are(
    database: Database, start_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """`capture()` emits its payload as a logical message with prefix `pgsse_changes` in wal
    mode; the reader hands it to the same dispatch as LISTEN's."""
    with scratch_database(database) as scratch:
        slot = f"slot_{uuid.uuid4().hex[:10]}"
        scratch.execute(ORDERS_TABLE)
        config = write_config(tmp_path, ORDERS)
        migrate(scratch.url, config, capture="wal", slot=slot)
        try:
            function = scratch.query("SELECT prosrc FROM pg_proc WHERE proname = 'capture'")
            assert "pg_logical_emit_message(true, 'pgsse_changes'" in function[0][0]
            assert "pg_notify" not in function[0][0]
            broker = start_broker(
                DATABASE_URL=scratch.url,
                BROKER_CONFIG=str(config),
                BROKER_CAPTURE="wal",
                BROKER_CAPTURE_SLOT=slot,
            )
            client = await SSEClient.open(broker.port, "/api/sse/orders", params={})
            assert (await client.event()).type == "connected"
            order = scratch.query(
                "INSERT INTO shop.orders (customer_id, status) VALUES ('7', 'open') RETURNING id"
            )[0][0]
            scratch.execute("UPDATE shop.orders SET status = 'paid' WHERE id = %s", (order,))
            scratch.execute("DELETE FROM shop.orders WHERE id = %s", (order,))
            events = [await client.event(timeout=10) for _ in range(3)]
            await client.close()
            assert [e.json["type"] for e in events] == ["insert", "update", "delete"]
            assert events[1].json["old"] == {"status": "open"}
            assert broker.stats()["counters"]["refused"] == 0
            broker.stop()
        finally:
            scratch.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (slot,),
            )


def test_serve_without_migrating_refuses_a_database_not_in_wal_mode(cluster: Database) -> None:
    """BROKER_MIGRATE=false against a database not migrated to wal mode (no slot, `messages`
    in no publication): nothing would ever reach a slot, so `serve` stops with one line
    saying what to run."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--port", "0"],
        env={
            **os.environ,
            "DATABASE_URL": cluster.url,
            "BROKER_MIGRATE": "false",
            "BROKER_CAPTURE": "wal",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "run `pgsse migrate` with BROKER_CAPTURE=wal" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_workers_in_wal_mode_need_the_bus() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--workers", "2"],
        env={**os.environ, "BROKER_CAPTURE": "wal", "DATABASE_URL": "postgresql:///x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "BROKER_BUS_URL" in done.stderr
