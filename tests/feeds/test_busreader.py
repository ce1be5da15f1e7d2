"""broker.feeds.busreader in process, on real Redis: a reader feeding a hub.

The stream itself is tested in test_bus.py; end to end tests over broker processes are in
tests/system/test_bus.py.
"""

from __future__ import annotations

import asyncio

from broker.feeds.bus import Bus
from broker.feeds.busreader import BusReader
from broker.filters import EVERYTHING
from broker.hub import Hub
from tests.support.inprocess import eventually, message, stop


async def test_a_reader_preloads_its_journal_then_routes_new_rows_once(bus: Bus) -> None:
    for i in (1, 3, 2):
        await bus.append(message(i))
    hub = Hub(max_subscribers=10, queue_size=100)
    reader = BusReader(bus, hub)
    task = asyncio.ensure_future(reader.run())
    try:
        await eventually(lambda: reader.connected, 10, "reader up")
        assert hub.journal.after(1, EVERYTHING) == [3, 2]  # resume is exact in stream order
        subscriber = hub.subscribe(None, None)
        for i in (5, 4, 4):  # 4 twice: a relay that died after XADD, say
            await bus.append(message(i))
        await eventually(lambda: subscriber.queued >= 2, 10, "two rows routed")
        await asyncio.sleep(0.2)  # a third (the duplicate) would be routed by now
        assert [event.id for event in subscriber.take()] == [5, 4]
        assert hub.journal.after(3, EVERYTHING) == [2, 5, 4]
        assert reader.lag_ms < 5_000
    finally:
        await stop(task)
