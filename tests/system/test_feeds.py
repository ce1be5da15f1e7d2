"""A generic feed end to end: an orders table (schema `shop`, key `customer_id`, filter
`status`) declared in a feeds file, real broker processes, real sockets.

Inserts, an update that moves an order between two filters (both streams see it: the one it
leaves as an `update` carrying `old`, the one it enters too), a delete seen only by the old
filter's streams; resume across all three (exact, once, commit order), out-of-order commits
resumed from the journal in commit order, `history=N`, and `reset` after pruning.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.feeds import changelog
from tests.support.database import Database
from tests.support.exposition import values
from tests.support.feeds import ORDERS_TABLE, Scratch, migrated, write_config
from tests.support.processes import BrokerProcess, free_port
from tests.support.redis import RedisServer, bus_role
from tests.support.sse import SSEClient, SSEEvent

CONFIG = """
[feeds.orders]
table = "shop.orders"
key = "customer_id"
filters = ["status"]
columns = ["id", "customer_id", "status", "total"]
events = ["insert", "update", "delete"]
"""
CHANGES = ("insert", "update", "delete")


@pytest.fixture
def shop(database: Database, tmp_path: Path) -> Iterator[tuple[Scratch, Path]]:
    with migrated(database, tmp_path, ORDERS_TABLE, CONFIG) as found:
        yield found


@pytest.fixture
def orders_broker(
    start_broker: Callable[..., BrokerProcess], shop: tuple[Scratch, Path]
) -> BrokerProcess:
    scratch, config = shop
    return start_broker(DATABASE_URL=scratch.url, BROKER_CONFIG=str(config))


def scrape(broker: BrokerProcess) -> str:
    with urllib.request.urlopen(broker.base_url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


async def stream(
    broker: BrokerProcess, headers: dict[str, str] | None = None, **params: str
) -> SSEClient:
    """A stream of the orders feed, read up to its `connected` event."""
    client = await SSEClient.open(broker.port, "/api/sse/orders", params=params, headers=headers)
    assert client.status == 200, await client.body()
    connected = await client.event()
    assert connected.type == "connected" and connected.json["feed"] == "orders"
    return client


def insert(scratch: Scratch, customer: str, status: str) -> int:
    """A new order; its id."""
    rows = scratch.query(
        "INSERT INTO shop.orders (customer_id, status) VALUES (%s, %s) RETURNING id",
        (customer, status),
    )
    return int(rows[0][0])


async def changes(client: SSEClient, count: int, timeout: float = 10) -> list[SSEEvent]:
    """The next `count` change events (heartbeats skipped)."""
    got: list[SSEEvent] = []
    while len(got) < count:
        event = (await client.events_until(lambda e: e.type in (*CHANGES, "reset"), timeout))[-1]
        got.append(event)
    return got


def summary(events: list[SSEEvent]) -> list[tuple[str, Any, Any]]:
    """(type, order id, old) of each change event."""
    return [(e.json["type"], e.json["data"]["id"], e.json.get("old")) for e in events]


async def test_an_order_moving_between_filters_and_its_delete(
    orders_broker: BrokerProcess, shop: tuple[Scratch, Path]
) -> None:
    scratch, _ = shop
    opened = await stream(orders_broker, customer_id="42", status="open")
    paid = await stream(orders_broker, customer_id="42", status="paid")
    everything = await stream(orders_broker)
    others = await stream(orders_broker, customer_id="43")

    order = insert(scratch, "42", "open")
    scratch.execute("UPDATE shop.orders SET status = 'paid', total = 9.5 WHERE id = %s", (order,))
    scratch.execute("DELETE FROM shop.orders WHERE id = %s", (order,))
    marker = insert(scratch, "42", "open")  # after the delete: what `opened` gets next
    theirs = insert(scratch, "43", "open")

    moved = {"status": "open"}
    assert summary(await changes(opened, 3)) == [
        ("insert", order, None),
        ("update", order, moved),  # it leaves the filter: the client sees `old`
        ("insert", marker, None),  # and no delete: the deleted row was paid
    ]
    assert summary(await changes(paid, 2)) == [
        ("update", order, moved),  # it enters the filter
        ("delete", order, None),
    ]
    every = await changes(everything, 5)
    assert [e.json["type"] for e in every] == ["insert", "update", "delete", "insert", "insert"]
    positions = [int(e.id or 0) for e in every]
    assert positions == sorted(positions)  # one transaction each: commit order is position order
    assert every[1].json["data"] == {
        "id": order,
        "customer_id": "42",
        "status": "paid",
        "total": 9.5,
    }
    assert every[2].json["data"] == {"id": order, "customer_id": "42", "status": "paid"}
    assert summary(await changes(others, 1)) == [("insert", theirs, None)]

    stats = orders_broker.stats()
    assert stats["channels"]["orders:42"] == 2 and stats["channels"]["orders:global"] == 1
    assert stats["feeds"]["orders"]["openStreams"] == 4
    scraped = values(await asyncio.to_thread(scrape, orders_broker))
    assert scraped['pgsse_feed_open_streams{feed="orders"}'] == 4
    assert scraped['pgsse_feed_routed_total{feed="orders"}'] == 5
    assert scraped["pgsse_open_streams"] == 4  # every feed's streams: what the cap counts


async def test_resume_across_insert_update_delete_is_exact(
    orders_broker: BrokerProcess, shop: tuple[Scratch, Path]
) -> None:
    scratch, _ = shop
    client = await stream(orders_broker, customer_id="42")
    first = insert(scratch, "42", "open")
    [seen] = await changes(client, 1)
    await client.close()

    order = insert(scratch, "42", "open")
    scratch.execute("UPDATE shop.orders SET status = 'paid' WHERE id = %s", (order,))
    scratch.execute("DELETE FROM shop.orders WHERE id = %s", (order,))
    insert(scratch, "43", "open")  # not this stream's

    resumed = await stream(orders_broker, {"Last-Event-ID": seen.id or ""}, customer_id="42")
    live = insert(scratch, "42", "open")
    got = await changes(resumed, 4)
    assert summary(got) == [
        ("insert", order, None),
        ("update", order, {"status": "open"}),
        ("delete", order, None),
        ("insert", live, None),
    ]
    assert seen.json["data"]["id"] == first
    # Once: nothing more comes before the next live change.
    last = insert(scratch, "42", "open")
    assert summary(await changes(resumed, 1)) == [("insert", last, None)]

    # A broker that never saw the position resumes by position from the log, the same way.
    other = BrokerProcess(dict(orders_broker.env), orders_broker.log_path.with_suffix(".2"))
    other.start()
    try:
        fresh = await stream(other, {"Last-Event-ID": seen.id or ""}, customer_id="42")
        assert [e.json["type"] for e in await changes(fresh, 5)] == [
            "insert",
            "update",
            "delete",
            "insert",
            "insert",
        ]
        await fresh.close()
    finally:
        other.stop()


async def test_out_of_order_commits_resume_in_commit_order(
    orders_broker: BrokerProcess, shop: tuple[Scratch, Path]
) -> None:
    scratch, _ = shop
    client = await stream(orders_broker, customer_id="42")
    a, b = insert(scratch, "42", "open"), insert(scratch, "42", "open")
    baseline = insert(scratch, "42", "open")
    *_, seen = await changes(client, 3)
    await client.close()

    watcher = await stream(orders_broker, customer_id="42")
    with scratch.connect() as first, scratch.connect() as second:
        first.autocommit = second.autocommit = False
        first.execute("UPDATE shop.orders SET status = 'paid' WHERE id = %s", (a,))  # lower
        second.execute("UPDATE shop.orders SET status = 'paid' WHERE id = %s", (b,))
        second.commit()  # the higher position commits first
        first.commit()
    marker = insert(scratch, "42", "open")
    live = await changes(watcher, 3)  # live in commit order; and all three routed now
    assert [e.json["data"]["id"] for e in live] == [b, a, marker]

    resumed = await stream(orders_broker, {"Last-Event-ID": seen.id or ""}, customer_id="42")
    got = await changes(resumed, 3)
    assert [e.json["data"]["id"] for e in got] == [b, a, marker]  # commit order
    assert int(got[0].id or 0) > int(got[1].id or 0)  # not position order
    # From the change that committed first, the one that drew a lower position still comes.
    again = await stream(orders_broker, {"Last-Event-ID": got[0].id or ""}, customer_id="42")
    assert [e.json["data"]["id"] for e in await changes(again, 2)] == [a, marker]
    assert baseline == seen.json["data"]["id"]


async def test_history_sends_the_last_matching_changes_then_live(
    orders_broker: BrokerProcess, shop: tuple[Scratch, Path]
) -> None:
    scratch, _ = shop
    ids = [insert(scratch, "42", "open") for _ in range(3)]
    insert(scratch, "43", "open")
    insert(scratch, "42", "paid")
    client = await stream(orders_broker, customer_id="42", status="open", history="2")
    live = insert(scratch, "42", "open")
    assert [e.json["data"]["id"] for e in await changes(client, 3)] == [*ids[1:], live]


async def test_a_resume_from_a_pruned_position_gets_reset_then_live(
    orders_broker: BrokerProcess, shop: tuple[Scratch, Path]
) -> None:
    scratch, _ = shop
    client = await stream(orders_broker, customer_id="42")
    insert(scratch, "42", "open")
    insert(scratch, "42", "open")
    first, _ = await changes(client, 2)
    await client.close()
    async with await psycopg.AsyncConnection.connect(scratch.url, autocommit=True) as conn:
        assert await changelog.prune(conn, 0) >= 2

    resumed = await stream(orders_broker, {"Last-Event-ID": first.id or ""}, customer_id="42")
    live = insert(scratch, "42", "open")
    reset, after = await changes(resumed, 2)
    assert reset.json == {"type": "reset", "reason": "history expired"}
    assert summary([after]) == [("insert", live, None)]


async def test_the_feed_route_refuses_what_it_does_not_know(
    orders_broker: BrokerProcess,
) -> None:
    for path, params, status, text in (
        ("/api/sse/nothing", {}, 404, "no such feed"),
        ("/api/sse/orders", {"customerId": "42"}, 400, "unknown parameter 'customerId'"),
        ("/api/sse/orders", [("status", "a"), ("status", "b")], 400, "status may be given once"),
        ("/api/sse/orders", {"customer_id": ""}, 400, "customer_id must not be empty"),
    ):
        client = await SSEClient.open(orders_broker.port, path, params=params)  # type: ignore[arg-type]
        assert client.status == status, path
        assert text in (await client.body()).decode()
        await client.close()


async def head(broker: BrokerProcess, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status = int((await asyncio.wait_for(reader.readline(), 10)).split()[1])
    writer.close()
    return status


async def test_the_cap_counts_the_streams_of_every_feed_and_head_tells_it(
    start_broker: Callable[..., BrokerProcess], shop: tuple[Scratch, Path]
) -> None:
    scratch, config = shop
    broker = start_broker(
        DATABASE_URL=scratch.url, BROKER_CONFIG=str(config), BROKER_MAX_CONNECTIONS="2"
    )
    assert await head(broker, "/api/sse/orders?customer_id=42") == 200
    assert await head(broker, "/api/sse/nothing") == 404
    orders = await stream(broker, customer_id="42")
    messages = await SSEClient.open(broker.port, params={"sessionId": "s"})
    assert messages.status == 200
    for path in ("/api/sse/orders", "/api/sse/messages"):
        full = await SSEClient.open(broker.port, path)
        assert full.status == 503, path
        await full.close()
    assert await head(broker, "/api/sse/orders") == 503
    await orders.close()
    await asyncio.to_thread(
        broker.wait_until, lambda: broker.stats()["totalConnections"] == 1, 10, "one stream"
    )
    assert await head(broker, "/api/sse/orders") == 200
    assert broker.stats()["counters"]["rejectedConnections"] == 3


async def test_a_token_is_required_for_a_feed_when_tokens_are(
    start_broker: Callable[..., BrokerProcess], shop: tuple[Scratch, Path]
) -> None:
    scratch, config = shop
    broker = start_broker(
        DATABASE_URL=scratch.url, BROKER_CONFIG=str(config), BROKER_AUTH_SECRET="s" * 32
    )
    client = await SSEClient.open(broker.port, "/api/sse/orders", params={"customer_id": "42"})
    assert client.status == 401


def test_serve_stops_on_a_mistake_in_the_feeds_file_with_one_line(
    shop: tuple[Scratch, Path], tmp_path: Path
) -> None:
    scratch, _ = shop
    bad = write_config(
        tmp_path, CONFIG.replace('filters = ["status"]', 'filters = ["statu"]'), "bad.toml"
    )
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve"],
        env={
            **os.environ,
            "DATABASE_URL": scratch.url,
            "BROKER_CONFIG": str(bad),
            "BROKER_PORT": str(free_port()),
            "BROKER_HOST": "127.0.0.1",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        'pgsse: feeds.orders.filters: column "statu" not in shop.orders (did you mean "status"?)'
    ]


async def test_on_a_bus_changes_reach_every_broker_resume_anywhere_and_survive_the_relay(
    start_broker: Callable[..., BrokerProcess], shop: tuple[Scratch, Path], redis: RedisServer
) -> None:
    scratch, config = shop
    env = {
        "DATABASE_URL": scratch.url,
        "BROKER_CONFIG": str(config),
        "BROKER_BUS_URL": redis.url,
        "BROKER_BUS_STREAM": f"test:{uuid.uuid4().hex[:8]}",
    }
    brokers = [start_broker(**env) for _ in range(2)]
    brokers[0].wait_until(
        lambda: sorted(bus_role(b) for b in brokers) == ["follower", "relay"],
        20,
        "one relay",
    )
    first, second = [await stream(b, customer_id="42") for b in brokers]
    order = insert(scratch, "42", "open")
    scratch.execute("UPDATE shop.orders SET status = 'paid' WHERE id = %s", (order,))
    scratch.execute("DELETE FROM shop.orders WHERE id = %s", (order,))
    seen = await changes(first, 3)
    assert summary(await changes(second, 3)) == summary(seen)
    await first.close()

    # Resumed on the other broker, from a change it read on the bus: exact.
    resumed = await stream(brokers[1], {"Last-Event-ID": seen[0].id or ""}, customer_id="42")
    assert [e.id for e in await changes(resumed, 2)] == [e.id for e in seen[1:]]

    relay = next(b for b in brokers if bus_role(b) == "relay")
    survivor = next(b for b in brokers if b is not relay)
    watcher = await stream(survivor, customer_id="42")
    assert relay.process is not None
    relay.process.kill()  # kill -9: what commits now has no relay until the next election
    relay.process.wait(10)
    meanwhile = insert(scratch, "42", "open")
    got = await changes(watcher, 1, timeout=20)
    assert summary(got) == [("insert", meanwhile, None)]
    survivor.wait_until(lambda: bus_role(survivor) == "relay", 20, "a new relay")
    after = insert(scratch, "42", "open")
    assert summary(await changes(watcher, 1)) == [("insert", after, None)]


async def test_the_broker_prunes_changes_past_the_retention(
    start_broker: Callable[..., BrokerProcess], shop: tuple[Scratch, Path]
) -> None:
    scratch, config = shop
    for _ in range(3):
        insert(scratch, "42", "open")
    scratch.execute("UPDATE pgsse.changes SET at = at - interval '2 hours' WHERE position < 3")
    broker = start_broker(
        DATABASE_URL=scratch.url, BROKER_CONFIG=str(config), BROKER_RETENTION="1h"
    )
    broker.wait_until(
        lambda: scratch.query("SELECT count(*) FROM pgsse.changes")[0][0] == 1, 10, "pruned"
    )
    assert scratch.query("SELECT feed, pruned_through FROM pgsse.retention") == [("orders", 2)]
    assert broker.ready()
