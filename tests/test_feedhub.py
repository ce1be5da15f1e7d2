"""A generic feed's routing, pure: key and filters matched as text, an update by its new OR
old row, a delete by its old row, encoded once, nothing twice, and the change journal."""

from __future__ import annotations

from typing import Any

import orjson

from broker.changes import Change
from broker.config.feeds import Feed
from broker.feedhub import ChangeJournal, FeedFilter, FeedHub, as_text, route_views
from broker.subscriber import SLOW_CONSUMER, Subscriber

ORDERS = Feed(
    name="orders",
    schema="shop",
    table="orders",
    key="customer_id",
    filters=("status", "rush"),
    columns=("id", "customer_id", "status", "rush"),
    events=("insert", "update", "delete"),
    primary_key=("id",),
    all_columns=("id", "customer_id", "status", "rush"),
)


def change(
    position: int,
    op: str = "insert",
    customer: Any = "42",
    status: Any = "open",
    old: dict[str, Any] | None = None,
    rush: Any = False,
) -> Change:
    data = {"id": position, "customer_id": customer, "status": status, "rush": rush}
    return Change("orders", position, op, data, old, "2026-01-01T00:00:00.000Z")


def positions(subscriber: Subscriber) -> list[int]:
    return [event.id for event in subscriber.take()]


def test_key_and_filters_route_inserts() -> None:
    hub = FeedHub(ORDERS, queue_size=10)
    mine = hub.subscribe(("42",), {})
    open_only = hub.subscribe(("42",), {"status": "open"})
    everyone = hub.subscribe(None, {})
    rush = hub.subscribe(None, {"rush": "true"})
    hub.publish(change(1))
    hub.publish(change(2, status="paid"))
    hub.publish(change(3, customer="43", rush=True))
    assert positions(mine) == [1, 2]
    assert positions(open_only) == [1]
    assert positions(everyone) == [1, 2, 3]
    assert positions(rush) == [3]


def test_an_update_reaches_the_old_and_the_new_filter_and_a_delete_the_old() -> None:
    hub = FeedHub(ORDERS, queue_size=10)
    opened = hub.subscribe(("42",), {"status": "open"})
    paid = hub.subscribe(("42",), {"status": "paid"})
    moved_to = hub.subscribe(("43",), {})
    both = hub.subscribe(("42", "43"), {})
    hub.publish(change(1, "update", status="paid", old={"status": "open"}))
    hub.publish(change(2, "delete", status="paid"))
    hub.publish(change(3, "update", customer="43", status="closed", old={"customer_id": "42"}))
    assert positions(opened) == [1]  # it left the filter
    assert positions(paid) == [1, 2]  # it entered; then the delete of a paid row
    assert positions(moved_to) == [3]
    assert positions(both) == [1, 2, 3]  # once each, though 3 moved between its keys


def test_values_match_as_postgres_writes_them_as_text() -> None:
    assert [as_text(v) for v in ("a", 42, 1.5, True, False, None)] == [
        "a",
        "42",
        "1.5",
        "true",
        "false",
        None,
    ]
    hub = FeedHub(ORDERS, queue_size=10)
    numeric_key = hub.subscribe(("42",), {})
    no_rush = hub.subscribe(None, {"rush": "false"})
    hub.publish(change(1, customer=42))  # an integer key column: `->>` writes 42
    hub.publish(change(2, customer=None, rush=None))  # JSON null matches no given value
    assert positions(numeric_key) == [1]
    assert positions(no_rush) == [1]


def test_one_encoding_shared_by_every_stream() -> None:
    hub = FeedHub(ORDERS, queue_size=10)
    first, second = hub.subscribe(("42",), {}), hub.subscribe(None, {})
    assert hub.publish(change(7, "update", old={"status": "new"})) == 2
    [a], [b] = first.take(), second.take()
    assert a.data is b.data
    assert a.data.startswith(b"id: 7\ndata: ")
    body = orjson.loads(a.data.split(b"data: ", 1)[1])
    assert body["type"] == "update" and body["feed"] == "orders"
    assert body["old"] == {"status": "new"}


def test_nothing_twice_a_copy_and_what_a_read_sent() -> None:
    hub = FeedHub(ORDERS, queue_size=10)
    stream = hub.subscribe(("42",), {})
    assert hub.publish(change(1)) == 1
    assert hub.publish(change(1)) == 0  # a backfill's overlap, a bus entry appended twice
    hub.publish(change(2))
    hub.mark_sent(stream, [2, 3], floor=1)  # a read of the log sent 2 and 3
    assert positions(stream) == []  # the queued copies are dropped
    hub.publish(change(3))  # routed after the read: skipped once
    hub.publish(change(4))
    assert positions(stream) == [4]


def test_the_journal_answers_in_delivery_order_and_forgets_the_oldest() -> None:
    journal = ChangeJournal(3)
    wanted = FeedFilter("customer_id", frozenset({"42"}))
    for position in (5, 3, 4, 6):  # 3 committed after 5
        journal.append(position, ({"customer_id": "42" if position != 4 else "43"},))
    assert 5 not in journal and journal.forgotten_up_to == 5
    assert journal.after(3, wanted) == [6]
    assert journal.after(5, wanted) is None  # forgotten: the caller reads by position
    assert journal.newest == 6 and len(journal) == 3


def test_route_views_of_an_update_hold_the_old_row_only_when_it_moved() -> None:
    assert route_views(ORDERS, change(1, "update", old=None)) == (
        {"customer_id": "42", "status": "open", "rush": "false"},
    )
    moved = route_views(ORDERS, change(1, "update", old={"status": "new"}))
    assert moved[1] == {"customer_id": "42", "status": "new", "rush": "false"}


def test_slow_consumers_channels_heartbeats_and_close() -> None:
    hub = FeedHub(ORDERS, queue_size=2)
    slow = hub.subscribe(("42",), {})
    several = hub.subscribe(("42", "43"), {})
    everyone = hub.subscribe(None, {})
    assert hub.channels() == {"orders:42": 2, "orders:43": 1, "orders:global": 1}
    for position in (1, 2, 3):
        hub.publish(change(position))
    assert slow.closed and slow.close_reason == SLOW_CONSUMER
    assert hub.counters.slow_consumer_disconnects == 3
    hub.unsubscribe(slow)
    hub.unsubscribe(slow)  # twice is harmless
    hub.unsubscribe(several)
    hub.unsubscribe(everyone)
    assert len(hub) == 0 and hub.channels() == {}
    live = hub.subscribe(None, {})
    hub.heartbeat()
    assert [event.id for event in live.take()] == [0]
    hub.close_all("bye")
    assert live.closed and live.close_reason == "bye"


def test_connected_names_the_feed_and_the_filter() -> None:
    hub = FeedHub(ORDERS, queue_size=2)
    stream = hub.subscribe(("42", "43"), {"status": "open"})
    first = hub.connected(stream, 3000)
    assert first.startswith(b"retry: 3000\ndata: ")
    body = orjson.loads(first.split(b"data: ", 1)[1])
    assert body["type"] == "connected" and body["feed"] == "orders"
    assert body["filters"] == {"customer_id": ["42", "43"], "status": "open"}
