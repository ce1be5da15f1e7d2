"""`/metrics`: the broker's counters in Prometheus exposition format, read at scrape time.

The hub and the listener count with plain integers (`HubCounters`, `Listener`) and the stream
records delivery latency into a plain `LatencyHistogram`, so the fan-out path pays nothing for
metrics. When Prometheus scrapes, `BrokerCollector` takes one `stats.snapshot` (on the event
loop thread where the counters are written) and turns it into metric families;
`/api/sse/stats` reads the same snapshot, so the two always agree.

Each app gets its own `CollectorRegistry` (not the library's global one), so several brokers in
one process, as in tests, never share or clash. No label takes a per-session value: a
session id would give every session its own time series.

Feeds: the unlabelled families are the process's totals over every feed (with no feeds file,
the messages feed's numbers, as before feeds); `pgsse_feed_*` give the same per feed, with a
`feed` label (the feed's name, from the feeds file: a bounded set, never a key value), when
the file declares feeds besides messages (without, the exposition is as it was).
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

from .stats import Stats, snapshot

if TYPE_CHECKING:
    from ..service import Broker

__all__ = ["BrokerCollector", "create_registry", "render"]


class BrokerCollector(Collector):
    """The contract's metrics, from the broker's own counters at the moment of the scrape."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        stats = snapshot(self._broker)
        yield GaugeMetricFamily("pgsse_open_streams", "Open SSE streams.", value=stats.open_streams)
        yield GaugeMetricFamily(
            "pgsse_max_streams",
            "Open streams at most (BROKER_MAX_CONNECTIONS); one more is answered 503.",
            value=stats.max_streams,
        )
        for name, help_text, value in (
            (
                "pgsse_rejected_connections",
                "Streams refused with 503 because the process was at its connection cap.",
                stats.rejected_connections,
            ),
            (
                "pgsse_notifications_received",
                "Notifications received on the LISTEN connection.",
                stats.notifications,
            ),
            (
                "pgsse_messages_routed",
                "Rows routed by the hub (notifications plus rows backfilled after a reconnect).",
                stats.messages_routed,
            ),
            (
                "pgsse_events_delivered",
                "Live message events queued to streams (one per row and matching stream).",
                stats.events_delivered,
            ),
            (
                "pgsse_replayed_events",
                "Message events sent from the replay of a resuming stream (Last-Event-ID).",
                stats.replayed_events,
            ),
            (
                "pgsse_slow_consumer_disconnects",
                "Streams closed because their queue was full.",
                stats.slow_consumer_disconnects,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        yield from _per_feed(stats)
        yield GaugeMetricFamily(
            "pgsse_listener_up",
            "1 while this process holds a LISTEN connection up, else 0: with a bus, 1 on the "
            "relay only (followers are ready with 0; see pgsse_bus_*).",
            value=int(stats.listener_connected),
        )
        yield CounterMetricFamily(
            "pgsse_listener_reconnects",
            "Times the LISTEN connection was re-established after a failure.",
            value=stats.listener_reconnects,
        )
        yield CounterMetricFamily(
            "pgsse_listener_backfilled_rows",
            "Rows read from the table after a listener reconnect (committed during the outage).",
            value=stats.backfilled,
        )
        if stats.bus_role is not None:
            yield GaugeMetricFamily(
                "pgsse_bus_relay",
                "1 while this broker is the bus's relay (holds the lock, LISTENs), else 0.",
                value=int(stats.bus_role == "relay"),
            )
            yield GaugeMetricFamily(
                "pgsse_bus_lag_seconds",
                "Seconds from XADD to this broker's read, of the last bus entry it read.",
                value=stats.bus_lag_ms / 1000,
            )
        if stats.capture_mode == "wal":
            yield GaugeMetricFamily(
                "pgsse_capture_reader",
                "1 while this process reads the capture slot (BROKER_CAPTURE=wal), else 0.",
                value=int(stats.capture_reader == "self"),
            )
            if stats.capture_lag_bytes is not None:
                yield GaugeMetricFamily(
                    "pgsse_capture_slot_lag_bytes",
                    "WAL bytes the capture slot keeps (written since its confirmed position).",
                    value=stats.capture_lag_bytes,
                )
            if stats.capture_lag_seconds is not None:
                yield GaugeMetricFamily(
                    "pgsse_capture_slot_lag_seconds",
                    "Seconds since the oldest transaction the slot holds unread committed.",
                    value=stats.capture_lag_seconds,
                )
        yield HistogramMetricFamily(
            "pgsse_delivery_latency_seconds",
            "Seconds from a row's notification being routed to its event being handed to the "
            "socket, per live event.",
            buckets=[(_le(bound), count) for bound, count in stats.latency_buckets],
            sum_value=stats.latency_sum,
        )


def _per_feed(stats: Stats) -> Iterator[Metric]:
    """The per-feed families (`feed` label): see the module docstring."""
    if len(stats.feeds) < 2:
        return
    streams = GaugeMetricFamily(
        "pgsse_feed_open_streams", "Open SSE streams of each feed.", labels=["feed"]
    )
    families = [
        (
            CounterMetricFamily(
                "pgsse_feed_routed",
                "Rows or changes of each feed routed by its hub.",
                labels=["feed"],
            ),
            "routed",
        ),
        (
            CounterMetricFamily(
                "pgsse_feed_events_delivered",
                "Live events of each feed queued to streams.",
                labels=["feed"],
            ),
            "events_delivered",
        ),
        (
            CounterMetricFamily(
                "pgsse_feed_replayed_events",
                "Events of each feed sent from a resume or history.",
                labels=["feed"],
            ),
            "replayed_events",
        ),
        (
            CounterMetricFamily(
                "pgsse_feed_slow_consumer_disconnects",
                "Streams of each feed closed because their queue was full.",
                labels=["feed"],
            ),
            "slow_consumer_disconnects",
        ),
    ]
    for name, feed in stats.feeds.items():
        streams.add_metric([name], feed.open_streams)
        for family, attribute in families:
            family.add_metric([name], getattr(feed, attribute))
    yield streams
    for family, _ in families:
        yield family


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
