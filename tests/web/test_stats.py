"""broker.web.stats in process: one snapshot of a real hub, read as the stats JSON and as the
Prometheus families, which must agree (the end-to-end agreement is in test_metrics)."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from broker.errors import AtCapacity
from broker.feedset import FeedSet
from broker.hub import Hub
from broker.web.metrics import create_registry, render
from broker.web.stats import snapshot
from tests.support.exposition import values
from tests.support.inprocess import message


def broker_of(hub: Hub) -> SimpleNamespace:
    listener = SimpleNamespace(
        connected=True,
        reconnects=1,
        notifications=5,
        backfilled=2,
        refused=SimpleNamespace(count=0),
    )
    return SimpleNamespace(
        hub=hub,
        feeds=FeedSet(hub),
        listener=listener,
        bus=None,
        capture=None,
        started_at=time.time() - 3,
    )


async def test_the_stats_json_keeps_its_contract() -> None:
    hub = Hub(max_subscribers=10, queue_size=1)
    hub.subscribe("a", None)
    hub.subscribe("a", "r1")
    hub.subscribe(None, None)
    hub.publish(message(1))
    hub.publish(message(2))  # the queues of size 1 overflow: slow consumers
    data = snapshot(broker_of(hub)).as_json()  # type: ignore[arg-type]
    assert set(data) == {
        "totalConnections",
        "channels",
        "bus",
        "capture",
        "listener",
        "counters",
        "uptimeSeconds",
        "tasks",
        "pid",
    }
    assert data["pid"] == os.getpid()  # with --workers, which worker answered
    assert data["bus"] is None  # no BROKER_BUS_URL (tests/system/test_bus.py sets it)
    assert data["capture"] == {  # BROKER_CAPTURE=notify (tests/system/test_capture.py: wal)
        "mode": "notify",
        "slot": None,
        "lagBytes": None,
        "lagSeconds": None,
        "reader": None,
    }
    assert data["listener"] == {
        "connected": True,
        "reconnects": 1,
        "notifications": 5,
        "backfilled": 2,
    }
    assert set(data["counters"]) == {
        "messagesRouted",
        "eventsDelivered",
        "slowConsumerDisconnects",
        "rejectedConnections",
        "replayedEvents",
        "refused",
        "idsReused",
    }
    assert data["counters"]["messagesRouted"] == 2
    assert data["totalConnections"] == len(hub)
    assert sum(data["channels"].values()) == len(hub)
    assert 3 <= data["uptimeSeconds"] < 60 and data["tasks"] >= 1


async def test_stats_and_metrics_read_the_same_snapshot() -> None:
    hub = Hub(max_subscribers=1, queue_size=10)
    hub.subscribe("a", None)
    hub.publish(message(1))
    with pytest.raises(AtCapacity):
        hub.subscribe("b", None)  # counted as rejected
    broker = broker_of(hub)
    data = snapshot(broker).as_json()  # type: ignore[arg-type]
    scraped = values(render(create_registry(broker), "")[0].decode())  # type: ignore[arg-type]
    assert scraped["pgsse_open_streams"] == data["totalConnections"] == 1
    assert scraped["pgsse_max_streams"] == 1
    assert scraped["pgsse_rejected_connections_total"] == 1
    for metric, counter in (
        ("pgsse_messages_routed_total", "messagesRouted"),
        ("pgsse_events_delivered_total", "eventsDelivered"),
        ("pgsse_rejected_connections_total", "rejectedConnections"),
        ("pgsse_slow_consumer_disconnects_total", "slowConsumerDisconnects"),
        ("pgsse_replayed_events_total", "replayedEvents"),
    ):
        assert scraped[metric] == data["counters"][counter], metric
    assert scraped["pgsse_notifications_received_total"] == data["listener"]["notifications"]
    assert scraped["pgsse_listener_reconnects_total"] == data["listener"]["reconnects"]
    assert scraped["pgsse_listener_backfilled_rows_total"] == data["listener"]["backfilled"]
