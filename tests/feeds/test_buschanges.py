"""Changes on the bus, pure: a change read from the log travels as the trigger's JSON, and a
reader takes a verified change entry but never a reference."""

from __future__ import annotations

import datetime

import pytest

from broker.changes import Change, parse_change
from broker.feeds.buschanges import ChangeEntry, TailChanges, parse_entry, payload


def test_a_change_from_the_log_travels_as_the_trigger_writes_it() -> None:
    at = datetime.datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=datetime.UTC)
    change = Change("orders", 7, "update", {"id": 1, "status": "paid"}, {"status": "open"}, at)
    encoded = payload(change)
    assert encoded.startswith(b'{"feed":')  # what readers and the listener look for
    parsed = parse_change(encoded)
    assert parsed == Change(
        "orders", 7, "update", change.data, change.old, "2026-01-02T03:04:05.678Z"
    )
    entry = parse_entry("1700000000000-0", encoded)
    assert entry == ChangeEntry("1700000000000-0", parsed)
    assert entry.added_ms == 1_700_000_000_000


def test_a_reference_or_a_malformed_change_is_refused() -> None:
    with pytest.raises(ValueError, match="reference"):
        parse_entry("1-0", b'{"feed":"orders","position":3,"ref":true}')
    with pytest.raises(ValueError, match="malformed"):
        parse_entry("1-0", b'{"feed":"orders","position":3,"op":"upsert"}')


def test_the_tail_holds_positions_per_feed() -> None:
    tail = TailChanges()
    for feed, position in (("orders", 5), ("orders", 3), ("items", 9)):
        tail.add(Change(feed, position, "insert", {}, None, ""))
    assert tail.holds("orders", 3) and not tail.holds("items", 3)
    assert tail.oldest("orders") == 3 and tail.oldest("none") is None
    assert tail.forgotten_up_to("orders") == 0
