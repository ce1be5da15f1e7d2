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


async def test_the_sizes_read_in_redis_are_the_entries_and_fill_in_under_newer_ones(
    bus: Bus,
) -> None:
    """`sizes_through` gives what `pages` measures, without the entries; `add_older` puts
    them under sizes known already, so the budget counts the whole stream (a relay that took
    the role without reading it)."""
    ids = [await bus.append(message(i, "s" * i)) for i in range(1, 251)]  # sizes differ
    measured = [size for page in [p async for p in bus.pages()] for _, size in page]
    assert [s async for page in bus.sizes_through(ids[-1]) for s in page] == measured
    assert [s async for page in bus.sizes_through(ids[99]) for s in page] == measured[150:]
    bus.sizes.reset(measured[:150][::-1])  # the newest 150, oldest first: a relay's own
    bus.sizes.add_older(measured[150:])
    assert bus.sizes.total == sum(measured)
    bus.sizes.budget = sum(measured[:10])  # the newest ten fit
    assert bus.sizes.keep() == 10
