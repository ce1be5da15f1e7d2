"""broker.web.metrics in process: the collector reads the hub's and the listener's counters when
scraped, and the text parses with prometheus-client's own parser. Over a real broker, moving
with the traffic and agreeing with `/api/sse/stats`: tests/system/test_metrics.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

from broker.feedset import FeedSet
from broker.hub import Hub
from broker.web.metrics import create_registry, render
from tests.support.exposition import values
from tests.support.inprocess import message


async def test_collector_reads_the_hub_and_listener_counters_at_scrape_time() -> None:
    hub = Hub(max_subscribers=10, queue_size=10)
    listener = SimpleNamespace(
        connected=True,
        reconnects=2,
        notifications=7,
        backfilled=3,
        refused=SimpleNamespace(count=0),
    )
    broker = SimpleNamespace(
        hub=hub,
        feeds=FeedSet(hub),
        listener=listener,
        bus=None,
        capture=None,
        started_at=time.time(),
    )
    registry = create_registry(broker)  # type: ignore[arg-type]
    first, second = hub.subscribe("a", None), hub.subscribe(None, None)
    hub.publish(message(1))
    hub.publish(message(2, "b"))
    hub.counters.delivery_latency.observe_since(event.born for event in first.take())
    hub.counters.delivery_latency.observe_since(event.born for event in second.take())
    listener.connected = False  # read when scraped, not when registered

    body, content_type = render(registry, "")
    assert content_type.startswith("text/plain; version=0.0.4")
    scraped = values(body.decode())
    assert scraped["pgsse_open_streams"] == 2
    assert scraped["pgsse_events_delivered_total"] == 3
    assert scraped["pgsse_messages_routed_total"] == 2
    assert scraped["pgsse_listener_up"] == 0
    assert scraped["pgsse_listener_reconnects_total"] == 2
    assert scraped["pgsse_notifications_received_total"] == 7
    assert scraped["pgsse_listener_backfilled_rows_total"] == 3
    assert scraped["pgsse_delivery_latency_seconds_count"] == 3
    assert scraped['pgsse_delivery_latency_seconds_bucket{le="+Inf"}'] == 3
    assert 0 < scraped["pgsse_delivery_latency_seconds_sum"] < 1
    assert "process_resident_memory_bytes" in scraped
