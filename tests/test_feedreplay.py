"""A generic feed's replay in process, against a real change log: resume from the journal
(delivery order) or by position (filtered pages), history, the replay limit, and `reset`
when the position was pruned."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from broker.changes import Change
from broker.config.feeds import load
from broker.feedhub import FeedHub
from broker.feedreplay import RESET, FeedReplay
from broker.feeds import changelog
from broker.store import Store
from tests.support.database import Database
from tests.support.feeds import ORDERS_CONFIG, ORDERS_TABLE, Scratch, migrated


@pytest.fixture
def shop(database: Database, tmp_path: Path) -> Iterator[tuple[Scratch, Path]]:
    with migrated(database, tmp_path, ORDERS_TABLE, ORDERS_CONFIG) as found:
        yield found


@pytest.fixture
async def store(shop: tuple[Scratch, Path]) -> AsyncIterator[Store]:
    async with Store.open(shop[0].url) as opened:
        yield opened


def orders_hub(shop: tuple[Scratch, Path]) -> FeedHub:
    scratch, config = shop
    with psycopg.connect(scratch.url) as conn:
        [feed] = [f for f in load(conn, config) if f.name == "orders"]
    return FeedHub(feed, queue_size=100)


def insert(scratch: Scratch, customer: str, status: str = "open") -> None:
    scratch.execute(
        "INSERT INTO shop.orders (customer_id, status) VALUES (%s, %s)", (customer, status)
    )


async def logged(scratch: Scratch) -> list[Change]:
    async with await psycopg.AsyncConnection.connect(scratch.url, autocommit=True) as conn:
        page = await changelog.read(conn, "orders", "customer_id", 0, changelog.Match())
    return page.changes


async def sent(replay: FeedReplay | None) -> list[Any]:
    assert replay is not None
    return [
        item if isinstance(item, bytes) else item.position
        async for page in replay.pages()
        for item in page
    ]


async def test_resume_from_the_journal_follows_delivery_order(
    shop: tuple[Scratch, Path], store: Store
) -> None:
    scratch, _ = shop
    for customer in ("42", "43", "42", "42"):
        insert(scratch, customer)
    first, other, second, third = await logged(scratch)
    hub = orders_hub(shop)
    for change in (first, other, third, second):  # `second` committed last
        hub.publish(change)
    stream = hub.subscribe(("42",), {})
    replay = FeedReplay.plan(
        hub, store, stream, last_event_id=first.position, history=None, limit=10
    )
    assert replay is not None and replay.journal_positions is not None
    assert await sent(replay) == [third.position, second.position]


async def test_resume_by_position_filters_pages_and_stops_one_past_the_limit(
    shop: tuple[Scratch, Path], store: Store
) -> None:
    scratch, _ = shop
    for n in range(6):
        insert(scratch, "42" if n % 2 == 0 else "43")
    changes = await logged(scratch)
    hub = orders_hub(shop)  # its journal holds nothing: this process started later
    stream = hub.subscribe(("42",), {"status": "open"})
    replay = FeedReplay.plan(
        hub, store, stream, last_event_id=changes[0].position, history=None, limit=1
    )
    assert replay is not None and replay.journal_positions is None
    assert await sent(replay) == [changes[2].position, changes[4].position]  # limit + 1
    assert stream.seen is not None and changes[0].position in stream.seen  # counted as sent


async def test_history_is_the_last_matching_changes(
    shop: tuple[Scratch, Path], store: Store
) -> None:
    scratch, _ = shop
    for customer in ("42", "42", "43", "42"):
        insert(scratch, customer)
    changes = await logged(scratch)
    hub = orders_hub(shop)
    replay = FeedReplay.plan(
        hub, store, hub.subscribe(("42",), {}), last_event_id=None, history=2, limit=10
    )
    assert await sent(replay) == [changes[1].position, changes[3].position]
    none_yet = FeedReplay.plan(
        hub, store, hub.subscribe(("44",), {}), last_event_id=None, history=2, limit=10
    )
    assert await sent(none_yet) == []


async def test_a_pruned_position_gets_reset_on_either_path(
    shop: tuple[Scratch, Path], store: Store
) -> None:
    scratch, _ = shop
    insert(scratch, "42")
    insert(scratch, "42")
    first, second = await logged(scratch)
    hub = orders_hub(shop)
    hub.publish(first)
    hub.publish(second)
    async with await psycopg.AsyncConnection.connect(scratch.url, autocommit=True) as conn:
        assert await changelog.prune(conn, 0) == 2
    from_journal = FeedReplay.plan(
        hub, store, hub.subscribe(None, {}), last_event_id=first.position, history=None, limit=9
    )
    assert await sent(from_journal) == [RESET]
    other = orders_hub(shop)  # holds nothing
    by_position = FeedReplay.plan(
        other, store, other.subscribe(None, {}), last_event_id=first.position, history=None, limit=9
    )
    assert await sent(by_position) == [RESET]
    assert by_position is not None and by_position.reset
    # From the newest pruned position on, nothing was lost: no reset.
    caught_up = FeedReplay.plan(
        other,
        store,
        other.subscribe(None, {}),
        last_event_id=second.position,
        history=None,
        limit=9,
    )
    assert await sent(caught_up) == []
