"""Reads of the change log (filtered, bounded pages) and pruning, which never blocks writers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from broker.database import migrate
from broker.feeds import changelog
from broker.feeds.capture import CHANNEL
from broker.feeds.changelog import Match
from tests.support.database import Database
from tests.support.feeds import (
    ORDERS_CONFIG,
    ORDERS_TABLE,
    Scratch,
    scratch_database,
    unsigned,
    write_config,
)


@pytest.fixture
def shop(database: Database, tmp_path: Path) -> Iterator[Scratch]:
    with scratch_database(database) as scratch:
        scratch.execute(ORDERS_TABLE)
        migrate(scratch.url, write_config(tmp_path, ORDERS_CONFIG))
        yield scratch


@pytest.fixture
async def conn(shop: Scratch) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(shop.url, autocommit=True) as conn:
        yield conn


def write(shop: Scratch, *statements: str) -> None:
    with shop.connect() as conn:
        for statement in statements:
            conn.execute(statement.encode())


def story(shop: Scratch) -> None:
    """Customer 42's order moves from open/eu to paid/us, then is deleted; 43 and 44 get one
    open order each."""
    write(
        shop,
        "INSERT INTO shop.orders (customer_id, status, region) VALUES ('42', 'open', 'eu')",
        "INSERT INTO shop.orders (customer_id, status, region) VALUES ('43', 'open', 'eu')",
        "UPDATE shop.orders SET status = 'paid', region = 'us' WHERE customer_id = '42'",
        "DELETE FROM shop.orders WHERE customer_id = '42'",
        "INSERT INTO shop.orders (customer_id, status, region) VALUES ('44', 'open', 'us')",
    )


async def ops(conn: psycopg.AsyncConnection[Any], match: Match, after: int = 0) -> list[str]:
    page = await changelog.read(conn, "orders", "customer_id", after, match)
    assert page.done
    return [f"{c.op} {c.data['customer_id']}" for c in page.changes]


async def test_an_update_matches_on_its_new_or_old_row_and_a_delete_on_its_old_row(
    shop: Scratch, conn: psycopg.AsyncConnection[Any]
) -> None:
    story(shop)
    assert await ops(conn, Match()) == [
        "insert 42",
        "insert 43",
        "update 42",
        "delete 42",
        "insert 44",
    ]
    open_eu = Match(filters={"status": "open", "region": "eu"})
    # the update is seen by open/eu (the row leaves it), the delete is not (it had left)
    assert await ops(conn, open_eu) == ["insert 42", "insert 43", "update 42"]
    paid_us = Match(filters={"status": "paid", "region": "us"})
    assert await ops(conn, paid_us) == ["update 42", "delete 42"]
    # a composite filter: open (old) and us (new) were never the same row's values
    assert await ops(conn, Match(filters={"status": "open", "region": "us"})) == ["insert 44"]
    assert await ops(conn, Match(keys=["42"])) == ["insert 42", "update 42", "delete 42"]
    assert await ops(conn, Match(keys=["43", "44"], filters={"region": "us"})) == ["insert 44"]
    assert await ops(conn, Match(keys=[])) == []
    page = await changelog.read(conn, "orders", "customer_id", 0, paid_us)
    update, delete = page.changes
    assert update.old == {"status": "open", "region": "eu"} and update.data["status"] == "paid"
    assert delete.old is None and set(delete.data) == {"id", "customer_id", "status", "region"}
    after = update.position
    assert await ops(conn, paid_us, after=after) == ["delete 42"]
    assert await ops(conn, Match(), after=delete.position) == ["insert 44"]
    last = shop.query("SELECT max(position) FROM pgsse.changes WHERE feed = 'orders'")[0][0]
    assert page.through == last  # the log was read to its end
    assert await ops(conn, Match(), after=page.through) == []


async def test_pages_are_bounded_and_resume_where_they_stopped(
    shop: Scratch, conn: psycopg.AsyncConnection[Any]
) -> None:
    values = ", ".join(f"('{n % 3}', 'open')" for n in range(30))
    write(shop, f"INSERT INTO shop.orders (customer_id, status) VALUES {values}")
    seen: list[int] = []
    after, pages = 0, 0
    while True:
        page = await changelog.read(
            conn, "orders", "customer_id", after, Match(keys=["1"]), limit=3, scan=7
        )
        pages += 1
        assert len(page.changes) <= 3 and page.through >= after
        seen += [c.position for c in page.changes]
        after = page.through
        if page.done:
            break
    all_ones = await changelog.read(conn, "orders", "customer_id", 0, Match(keys=["1"]))
    assert seen == [c.position for c in all_ones.changes] and len(seen) == 10
    assert pages >= 5  # 30 changes, at most 7 read a page


async def test_prune_deletes_old_changes_and_marks_how_far(
    shop: Scratch, conn: psycopg.AsyncConnection[Any]
) -> None:
    story(shop)
    assert await changelog.pruned_through(conn, "orders") == 0
    positions = [p for (p,) in shop.query("SELECT position FROM pgsse.changes ORDER BY 1")]
    shop.execute(
        "UPDATE pgsse.changes SET at = now() - interval '8 days' WHERE position <= %s",
        (positions[2],),
    )
    assert await changelog.prune(conn, 7 * 86400, batch=2) == 3
    left = [p for (p,) in shop.query("SELECT position FROM pgsse.changes ORDER BY 1")]
    assert left == positions[3:]
    assert await changelog.pruned_through(conn, "orders") == positions[2]
    page = await changelog.read(conn, "orders", "customer_id", positions[1], Match())
    assert page.pruned_through == positions[2] and page.expired(positions[1])
    assert [c.position for c in page.changes] == positions[3:]  # position[2] is gone
    page = await changelog.read(conn, "orders", "customer_id", positions[2], Match())
    assert not page.expired(positions[2])  # nothing after it was pruned
    empty = await changelog.read(conn, "orders", "customer_id", positions[-1], Match())
    assert (empty.changes, empty.done, empty.pruned_through) == ([], True, positions[2])
    assert await changelog.prune(conn, 7 * 86400) == 0


async def test_one_pruner_at_a_time(shop: Scratch, conn: psycopg.AsyncConnection[Any]) -> None:
    story(shop)
    shop.execute("UPDATE pgsse.changes SET at = now() - interval '8 days'")
    async with await psycopg.AsyncConnection.connect(shop.url) as other:
        assert await changelog.prune_batch(other, 86400, batch=1) == 1  # holds the lock
        assert await changelog.prune(conn, 86400) == 0
        await other.rollback()
    assert await changelog.prune(conn, 86400) == 5


async def test_a_running_prune_never_makes_a_writer_wait(
    shop: Scratch, conn: psycopg.AsyncConnection[Any]
) -> None:
    story(shop)
    shop.execute("UPDATE pgsse.changes SET at = now() - interval '8 days'")
    async with await psycopg.AsyncConnection.connect(shop.url) as pruner:
        assert await changelog.prune_batch(pruner, 86400, batch=100) == 5  # not committed
        async with await psycopg.AsyncConnection.connect(shop.url, autocommit=True) as writer:
            await writer.execute("SET lock_timeout = '2s'")
            for statement in (
                "INSERT INTO shop.orders (customer_id, status) VALUES ('45', 'open')",
                "UPDATE shop.orders SET status = 'paid' WHERE customer_id = '43'",
                "DELETE FROM shop.orders WHERE customer_id = '44'",
            ):
                await asyncio.wait_for(writer.execute(statement.encode()), timeout=5)
        await pruner.commit()
    page = await changelog.read(conn, "orders", "customer_id", 0, Match())
    assert [(c.op, c.data["customer_id"]) for c in page.changes] == [
        ("insert", "45"),
        ("update", "43"),
        ("delete", "44"),
    ]


async def test_a_reference_notification_is_fetched_by_position(
    shop: Scratch, conn: psycopg.AsyncConnection[Any]
) -> None:
    customer = "c" * 10_000  # the change does not fit in a notification
    with shop.connect() as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        write(shop, f"INSERT INTO shop.orders (customer_id, status) VALUES ('{customer}', 'open')")
        (notification,) = list(listener.notifies(timeout=5, stop_after=1))
    reference = orjson.loads(unsigned(notification.payload))
    assert reference == {"feed": "orders", "position": reference["position"], "ref": True}
    change = await changelog.fetch(conn, "orders", reference["position"])
    assert change is not None and change.op == "insert"
    assert change.data["customer_id"] == customer and change.old is None
    assert await changelog.fetch(conn, "orders", reference["position"] + 1) is None
