"""broker.flusher in-process: idle streams' events batched into one sink write per loop turn,
and handed back to the stream's task when the sink refuses."""

from __future__ import annotations

import asyncio

from broker.events import Message
from broker.flusher import Flusher
from broker.hub import Hub
from broker.latency import LatencyHistogram


class RecordingSink:
    """A sink that takes writes while `open`, recording them."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.open = True

    def write(self, data: bytes) -> bool:
        if self.open:
            self.writes.append(data)
        return self.open


def message(id_: int) -> Message:
    return Message(id_, "a", None, f"m{id_}", False, True, None, "2026-01-01T00:00:00.000Z")


async def next_turn() -> None:
    await asyncio.sleep(0)


async def test_a_burst_goes_out_in_one_write_per_turn() -> None:
    latency = LatencyHistogram()
    hub = Hub(max_subscribers=10, queue_size=10)
    hub.on_idle_ready = Flusher(asyncio.get_running_loop(), latency).mark
    subscriber, sink = hub.subscribe("a", None), RecordingSink()
    subscriber.sink = sink
    for id_ in (1, 2, 3):
        hub.publish(message(id_))
    assert sink.writes == []  # not yet: once per turn
    await next_turn()
    assert len(sink.writes) == 1
    assert [sink.writes[0].count(b"id: %d\n" % i) for i in (1, 2, 3)] == [1, 1, 1]
    assert subscriber.queued == 0 and subscriber.direct_sent == 3
    assert latency.count == 3  # every routed event observed
    hub.heartbeat()  # heartbeats take the same path
    await next_turn()
    assert len(sink.writes) == 2 and b"heartbeat" in sink.writes[1]


async def test_a_refusing_sink_leaves_the_events_queued_and_wakes_the_task() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    hub.on_idle_ready = Flusher(asyncio.get_running_loop(), LatencyHistogram()).mark
    subscriber, sink = hub.subscribe("a", None), RecordingSink()
    sink.open = False
    subscriber.sink = sink
    waiter = asyncio.ensure_future(subscriber.wait())
    await next_turn()
    hub.publish(message(1))
    hub.publish(message(2))
    assert not waiter.done()  # handed to the flusher, not woken
    await asyncio.wait_for(waiter, 1)
    assert [event.id for event in subscriber.take()] == [1, 2]
    assert subscriber.direct_sent == 0


async def test_without_a_sink_the_task_is_woken() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    hub.on_idle_ready = Flusher(asyncio.get_running_loop(), LatencyHistogram()).mark
    subscriber = hub.subscribe("a", None)
    waiter = asyncio.ensure_future(subscriber.wait())
    await next_turn()
    hub.heartbeat()
    await asyncio.wait_for(waiter, 1)
    assert [event.id for event in subscriber.take()] == [0]


async def test_the_deliveries_of_one_event_are_observed_together() -> None:
    latency = LatencyHistogram()
    hub = Hub(max_subscribers=10, queue_size=10)
    hub.on_idle_ready = Flusher(asyncio.get_running_loop(), latency).mark
    sinks = [RecordingSink() for _ in range(3)]
    for sink in sinks:
        hub.subscribe("a", None).sink = sink
    hub.publish(message(1))
    hub.publish(message(2))
    hub.heartbeat()  # not a row: no latency
    await next_turn()
    assert all(len(sink.writes) == 1 for sink in sinks)
    assert latency.count == 6 and sum(1 for count in latency.counts if count) <= 2
