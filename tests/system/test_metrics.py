"""`/metrics` of a real broker: Prometheus text that prometheus-client's own parser reads,
moving exactly with the traffic, and agreeing with `/api/sse/stats`."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.support.database import Database
from tests.support.exposition import values
from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient, subscribe

StartBroker = Callable[..., BrokerProcess]

# The contract's metrics: family name -> type.
CONTRACT = {
    "pgsse_open_streams": "gauge",
    "pgsse_rejected_connections": "counter",
    "pgsse_notifications_received": "counter",
    "pgsse_events_delivered": "counter",
    "pgsse_replayed_events": "counter",
    "pgsse_slow_consumer_disconnects": "counter",
    "pgsse_listener_up": "gauge",
    "pgsse_listener_reconnects": "counter",
    "pgsse_delivery_latency_seconds": "histogram",
}


def fetch(broker: BrokerProcess, accept: str | None = None) -> tuple[str, str]:
    """(content type, body) of GET /metrics."""
    headers = {"Accept": accept} if accept else {}
    request = urllib.request.Request(broker.base_url + "/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def scrape(broker: BrokerProcess) -> dict[str, float]:
    return values(fetch(broker)[1])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after[name] - before.get(name, 0.0)


async def test_metrics_parse_with_prometheus_client_and_hold_the_contract(
    broker: BrokerProcess,
) -> None:
    content_type, text = fetch(broker)
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {name: families[name].type for name in CONTRACT} == CONTRACT
    for family in families.values():
        if family.name.startswith("pgsse_"):
            for sample in family.samples:
                # No per-session (or any other) label: only the histogram's `le`.
                assert set(sample.labels) <= {"le"}, sample
    buckets = [s for s in families["pgsse_delivery_latency_seconds"].samples if "le" in s.labels]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert buckets[-1].labels["le"] == "+Inf"
    assert values(text)["pgsse_listener_up"] == 1

    # A scraper that asks for OpenMetrics gets it, and that parser reads it too.
    content_type, text = fetch(broker, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert CONTRACT.keys() <= {family.name for family in openmetrics_families(text)}


async def test_counters_move_by_the_expected_amounts_and_agree_with_stats(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    broker = start_broker(BROKER_MAX_CONNECTIONS="6")
    before = scrape(broker)
    assert before["pgsse_open_streams"] == 0

    # 3 streams of the session and 1 global one; 5 rows: 20 live events.
    clients = [await subscribe(broker, sessionId=session_id) for _ in range(3)]
    clients.append(await subscribe(broker))
    rows = [database.insert(session_id, f"m{n}") for n in range(5)]
    for client in clients:
        assert [(await client.message()).id for _ in rows] == [str(row) for row in rows]
    wait_for(
        lambda: delta(scrape(broker), before, "pgsse_delivery_latency_seconds_count") == 20,
        "20 latency observations",
    )
    after = scrape(broker)
    assert after["pgsse_open_streams"] == 4
    assert delta(after, before, "pgsse_notifications_received_total") == 5
    assert delta(after, before, "pgsse_messages_routed_total") == 5
    assert delta(after, before, "pgsse_events_delivered_total") == 20
    assert 0 < delta(after, before, "pgsse_delivery_latency_seconds_sum") < 20 * 1.0
    assert delta(after, before, 'pgsse_delivery_latency_seconds_bucket{le="+Inf"}') == 20
    assert delta(after, before, "pgsse_replayed_events_total") == 0

    # A stream resuming from before the first row is replayed the 5 rows.
    resumed = await subscribe(broker, sessionId=session_id, lastEventId=str(rows[0] - 1))
    assert [(await resumed.message()).id for _ in rows] == [str(row) for row in rows]
    # The 6th stream is the cap; the 7th is refused.
    clients += [resumed, await subscribe(broker)]
    refused = await SSEClient.open(broker.port, params={"sessionId": session_id})
    assert refused.status == 503
    await refused.close()
    after = scrape(broker)
    assert after["pgsse_open_streams"] == 6
    assert delta(after, before, "pgsse_replayed_events_total") == 5
    assert delta(after, before, "pgsse_rejected_connections_total") == 1
    assert delta(after, before, "pgsse_events_delivered_total") == 20  # replay is not live

    stats = broker.stats()
    assert stats["totalConnections"] == after["pgsse_open_streams"]
    for field, name in STATS_COUNTERS.items():
        assert stats["counters"][field] == after[name], field
    assert stats["listener"]["notifications"] == after["pgsse_notifications_received_total"]
    assert stats["listener"]["reconnects"] == after["pgsse_listener_reconnects_total"]
    assert stats["listener"]["connected"] is (after["pgsse_listener_up"] == 1)

    await asyncio.gather(*(client.close() for client in clients))
    wait_for(lambda: scrape(broker)["pgsse_open_streams"] == 0, "streams closed")


# Counters of /api/sse/stats and the metric of the same source.
STATS_COUNTERS = {
    "messagesRouted": "pgsse_messages_routed_total",
    "eventsDelivered": "pgsse_events_delivered_total",
    "slowConsumerDisconnects": "pgsse_slow_consumer_disconnects_total",
    "rejectedConnections": "pgsse_rejected_connections_total",
    "replayedEvents": "pgsse_replayed_events_total",
}


async def test_listener_up_and_reconnects_follow_a_terminated_listener(
    broker: BrokerProcess, database: Database
) -> None:
    before = scrape(broker)
    assert before["pgsse_listener_up"] == 1
    assert database.terminate_listeners() == 1
    wait_for(
        lambda: delta(scrape(broker), before, "pgsse_listener_reconnects_total") == 1,
        "a listener reconnect",
    )
    assert scrape(broker)["pgsse_listener_up"] == 1


def stalled_stream(port: int, session_id: str) -> socket.socket:
    """A stream whose client never reads, with a receive buffer as small as the kernel allows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    request = f"GET /api/sse/messages?sessionId={session_id} HTTP/1.1\r\nHost: x\r\n\r\n"
    sock.sendall(request.encode())
    return sock


async def test_a_slow_consumer_disconnect_is_counted_once(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    broker = start_broker(BROKER_QUEUE_SIZE="2")
    before = scrape(broker)
    reader = await subscribe(broker, sessionId=session_id)
    stalled = stalled_stream(broker.port, session_id)
    try:
        wait_for(lambda: scrape(broker)["pgsse_open_streams"] == 2, "two streams")
        content = "x" * 200_000
        rows = 0
        while scrape(broker)["pgsse_slow_consumer_disconnects_total"] == before.get(
            "pgsse_slow_consumer_disconnects_total", 0
        ):
            assert rows < 200, "the stalled stream was never closed"
            row_id = database.insert(session_id, content)
            rows += 1
            assert (await reader.message()).id == str(row_id)  # the reader is not held up
        wait_for(lambda: scrape(broker)["pgsse_open_streams"] == 1, "stalled stream closed")
        after = scrape(broker)
        assert delta(after, before, "pgsse_slow_consumer_disconnects_total") == 1
        assert broker.stats()["counters"]["slowConsumerDisconnects"] == 1
        print(f"\nstalled stream closed after {rows} rows of 200 kB")
    finally:
        stalled.close()
        await reader.close()
