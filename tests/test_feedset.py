"""The feeds of a running broker, in process against the test cluster: the feeds file loaded
into one registry, changes dispatched from the listener's connection (notified, or read from
the log when too large for NOTIFY), the cap counting every feed's streams, heartbeats to all."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from broker.config.settings import Settings
from broker.errors import AtCapacity
from broker.service import Broker
from tests.support.database import Database
from tests.support.feeds import ORDERS_CONFIG, ORDERS_TABLE, Scratch, migrated
from tests.support.inprocess import received


@pytest.fixture
def shop(database: Database, tmp_path: Path) -> Iterator[tuple[Scratch, Path]]:
    with migrated(database, tmp_path, ORDERS_TABLE, ORDERS_CONFIG) as found:
        yield found


def events(data: list[bytes]) -> list[dict[str, object]]:
    found = []
    for block in data:
        line = next(ln for ln in block.split(b"\n") if ln.startswith(b"data: "))
        found.append(orjson.loads(line[6:]))
    return found


async def test_changes_reach_their_feed_from_the_listening_connection(
    shop: tuple[Scratch, Path],
) -> None:
    scratch, config = shop
    settings = Settings(database_url=scratch.url, config=config, heartbeat_seconds=60)
    async with Broker.running(settings) as broker:
        await asyncio.wait_for(broker.listener.started.wait(), 10)
        orders = broker.feeds.get("orders")
        assert orders is not None and broker.feeds.get("messages") is None
        mine = orders.subscribe(("42",), {"status": "open"})
        everyone = orders.subscribe(None, {})
        scratch.execute(
            "INSERT INTO shop.orders (customer_id, status, note) VALUES ('42', 'open', 'a')"
        )
        # Too large for NOTIFY: the notification is a reference, read from the log.
        scratch.execute(
            "INSERT INTO shop.orders (customer_id, status) VALUES ('43', %s)", ("x" * 9000,)
        )
        assert len(await received(mine, 1)) == 1
        got = await received(everyone, 2)
        assert len(got) == 2 and got == sorted(got)
        assert orders.counters.messages_routed == 2
        assert broker.listener.refused.count == 0


async def test_the_cap_counts_every_feed_and_heartbeats_reach_all(
    shop: tuple[Scratch, Path], session_id: str
) -> None:
    scratch, config = shop
    settings = Settings(
        database_url=scratch.url, config=config, heartbeat_seconds=60, max_connections=2
    )
    async with Broker.running(settings) as broker:
        await asyncio.wait_for(broker.listener.started.wait(), 10)
        orders = broker.feeds.get("orders")
        assert orders is not None
        broker.feeds.admit()
        stream = orders.subscribe(None, {})
        messages, _ = broker.open_stream(session_id, None)
        with pytest.raises(AtCapacity):
            broker.open_stream(session_id, None)
        broker.feeds.heartbeat()
        assert [e["type"] for e in events([e.data for e in stream.take()])] == ["heartbeat"]
        assert [e["type"] for e in events([e.data for e in messages.take()])] == ["heartbeat"]
