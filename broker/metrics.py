"""`/metrics`: the broker's counters in Prometheus exposition format, read at scrape time.

The hub and the listener count with plain integers (`HubCounters`, `Listener`) and the stream
records delivery latency into a plain `LatencyHistogram`, so the fan-out path pays nothing for
metrics. `BrokerCollector` turns those same numbers into metric families when Prometheus
scrapes, on the event loop thread where they are written, so one scrape is a consistent
snapshot. `/api/sse/stats` reads the same fields, so the two always agree.

Each app gets its own `CollectorRegistry` (not the library's global one), so several brokers in
one process, as in tests, never share or clash. No label takes a per-session value: a
session id would give every session its own time series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from .service import Broker

__all__ = ["BrokerCollector", "create_registry", "render"]


class BrokerCollector(Collector):
    """The contract's metrics, from the broker's own counters at the moment of the scrape."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        hub = self._broker.hub
        counters = hub.counters
        listener = self._broker.listener
        yield GaugeMetricFamily("pgsse_open_streams", "Open SSE streams.", value=len(hub))
        yield GaugeMetricFamily(
            "pgsse_max_streams",
            "Open streams at most (BROKER_MAX_CONNECTIONS); one more is answered 503.",
            value=hub.max_subscribers,
        )
        yield CounterMetricFamily(
            "pgsse_rejected_connections",
            "Streams refused with 503 because the process was at its connection cap.",
            value=counters.rejected_connections,
        )
        yield CounterMetricFamily(
            "pgsse_notifications_received",
            "Notifications received on the LISTEN connection.",
            value=listener.notifications,
        )
        yield CounterMetricFamily(
            "pgsse_messages_routed",
            "Rows routed by the hub (notifications plus rows backfilled after a reconnect).",
            value=counters.messages_routed,
        )
        yield CounterMetricFamily(
            "pgsse_events_delivered",
            "Live message events queued to streams (one per row and matching stream).",
            value=counters.events_delivered,
        )
        yield CounterMetricFamily(
            "pgsse_replayed_events",
            "Message events sent from the replay of a resuming stream (Last-Event-ID).",
            value=counters.replayed_events,
        )
        yield CounterMetricFamily(
            "pgsse_slow_consumer_disconnects",
            "Streams closed because their queue was full.",
            value=counters.slow_consumer_disconnects,
        )
        yield GaugeMetricFamily(
            "pgsse_listener_up",
            "1 while the LISTEN connection is up (what /readyz reports), else 0.",
            value=int(listener.connected),
        )
        yield CounterMetricFamily(
            "pgsse_listener_reconnects",
            "Times the LISTEN connection was re-established after a failure.",
            value=listener.reconnects,
        )
        yield CounterMetricFamily(
            "pgsse_listener_backfilled_rows",
            "Rows read from the table after a listener reconnect (committed during the outage).",
            value=listener.backfilled,
        )
        latency = counters.delivery_latency
        yield HistogramMetricFamily(
            "pgsse_delivery_latency_seconds",
            "Seconds from a row's notification being routed to its event being handed to the "
            "socket, per live event.",
            buckets=[(_le(bound), count) for bound, count in latency.cumulative()],
            sum_value=latency.sum,
        )


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def create_registry(broker: Broker) -> CollectorRegistry:
    """A registry of this broker's metrics plus the standard `process_*` ones."""
    registry = CollectorRegistry()
    registry.register(BrokerCollector(broker))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The exposition body and its content type, in the format `accept` asks for
    (Prometheus text format unless OpenMetrics is asked for)."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
