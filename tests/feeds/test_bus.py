"""broker.feeds.bus in process, on real Redis: the stream.

A reader feeding a hub is in test_busreader.py, the relay's in-process tests in
test_relay.py; end to end tests over broker processes are in tests/system/test_bus.py.
"""

from __future__ import annotations

from broker.feeds.bus import Bus
from tests.support.inprocess import message


async def test_entries_round_trip_in_append_order_and_the_stream_is_trimmed(bus: Bus) -> None:
    for i in (5, 3, 4):  # out of id order, as commits can be
        await bus.append(message(i))
    entries = await bus.tail()
    assert [e.message.id for e in entries] == [5, 3, 4]
    assert entries[0].message == message(5)
    later, position, _ = await bus.read(entries[0].stream_id, block_ms=10)
    assert [e.message.id for e in later] == [3, 4] and position == entries[-1].stream_id
    for i in range(100, 3_100):
        await bus.append(message(i))
    kept = len(await bus.tail(count=10_000))
    assert 1_000 <= kept < 1_500, kept  # MAXLEN ~: about maxlen, trimmed by whole nodes
