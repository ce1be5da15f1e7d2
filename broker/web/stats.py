"""One snapshot of the broker's numbers, read by `/api/sse/stats` and by `/metrics`.

As psycopg_pool's `get_stats()`: the hub's and the listener's plain counters are walked in one
place, `snapshot`, on the event loop thread where they are written, so one snapshot is
consistent and the two readers always agree. `Stats.as_json` is the stats endpoint's `data`;
`metrics.BrokerCollector` turns the same snapshot into metric families.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..hub import HubCounters
    from ..service import Broker

__all__ = ["FeedStats", "Stats", "snapshot"]


@dataclass(frozen=True, slots=True)
class FeedStats:
    """One feed's numbers: `routed` counts its rows or changes routed."""

    open_streams: int
    routed: int
    events_delivered: int
    replayed_events: int
    slow_consumer_disconnects: int

    def as_json(self) -> dict[str, int]:
        return {
            "openStreams": self.open_streams,
            "routed": self.routed,
            "eventsDelivered": self.events_delivered,
            "replayedEvents": self.replayed_events,
            "slowConsumerDisconnects": self.slow_consumer_disconnects,
        }


@dataclass(frozen=True, slots=True)
class Stats:
    """The broker's numbers at one moment. Counters only grow; the rest are gauges."""

    open_streams: int
    max_streams: int
    channels: dict[str, int]  # open streams per logical channel
    listener_connected: bool
    listener_reconnects: int
    notifications: int  # received on the LISTEN connection
    backfilled: int  # rows read after a listener reconnect
    messages_routed: int
    events_delivered: int
    slow_consumer_disconnects: int
    rejected_connections: int
    replayed_events: int
    latency_buckets: list[tuple[float, int]]  # delivery latency: (upper bound, cumulative)
    latency_sum: float
    uptime_seconds: float
    tasks: int  # asyncio tasks of the process
    pid: int  # this process's: with `--workers N`, which worker answered
    bus_role: str | None = None  # "relay" or "follower"; None without a bus
    bus_last_id: str | None = None  # the last stream id this broker read
    bus_lag_ms: float = 0.0  # XADD to this broker's read, of the last entry read
    bus_lease_live: bool = False  # a relay renews its lease (feeds/relay.py)
    bus_gaps: int = 0  # times the stream was trimmed past this broker (feeds/busreader.py)
    bus_takeovers: int = 0  # frozen relays' backends this broker terminated
    refused: int = 0  # notifications and bus entries dropped: unsigned, foreign, malformed
    ids_reused: int = 0  # times the table's ids were found reused (`Hub.publish`)
    capture_mode: str = "notify"  # BROKER_CAPTURE
    capture_slot: str | None = None  # wal: the slot's name
    capture_lag_bytes: int | None = None  # wal: WAL the slot keeps; None: not sampled yet
    capture_lag_seconds: float | None = None  # wal: since the oldest unread commit
    capture_reader: str | None = None  # wal: "self", "other" (another session), None (no one)
    # Per feed, messages first; the totals above are every feed's together.
    feeds: dict[str, FeedStats] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The `data` of `GET /api/sse/stats`; `feeds` (per feed) only when a feeds file
        declares feeds besides messages, so the messages-only answer keeps its shape."""
        data = {
            "totalConnections": self.open_streams,
            "channels": self.channels,
            "bus": None
            if self.bus_role is None
            else {
                "role": self.bus_role,
                "lastId": self.bus_last_id,
                "lag": self.bus_lag_ms,
                "leaseLive": self.bus_lease_live,
                "gaps": self.bus_gaps,
                "takeovers": self.bus_takeovers,
            },
            "capture": {
                "mode": self.capture_mode,
                "slot": self.capture_slot,
                "lagBytes": self.capture_lag_bytes,
                "lagSeconds": self.capture_lag_seconds,
                "reader": self.capture_reader,
            },
            "listener": {
                "connected": self.listener_connected,
                "reconnects": self.listener_reconnects,
                "notifications": self.notifications,
                "backfilled": self.backfilled,
            },
            "counters": {
                "messagesRouted": self.messages_routed,
                "eventsDelivered": self.events_delivered,
                "slowConsumerDisconnects": self.slow_consumer_disconnects,
                "rejectedConnections": self.rejected_connections,
                "replayedEvents": self.replayed_events,
                "refused": self.refused,
                "idsReused": self.ids_reused,
            },
            "uptimeSeconds": round(self.uptime_seconds, 3),
            "tasks": self.tasks,
            "pid": self.pid,
        }
        if len(self.feeds) > 1:
            data["feeds"] = {name: feed.as_json() for name, feed in self.feeds.items()}
        return data


def snapshot(broker: Broker) -> Stats:
    """The numbers of `broker` now. Call it on the event loop thread."""
    hub = broker.hub
    counters = hub.counters
    latency = counters.delivery_latency
    feeds = {"messages": _feed(len(hub), counters)}
    channels = hub.channels()
    for generic in broker.feeds:
        feeds[generic.name] = _feed(len(generic), generic.counters)
        channels.update(generic.channels())
    every = feeds.values()
    return Stats(
        open_streams=sum(feed.open_streams for feed in every),
        max_streams=hub.max_subscribers,
        channels=channels,
        **_listener(broker),
        messages_routed=sum(feed.routed for feed in every),
        events_delivered=sum(feed.events_delivered for feed in every),
        slow_consumer_disconnects=sum(feed.slow_consumer_disconnects for feed in every),
        rejected_connections=counters.rejected_connections,
        replayed_events=sum(feed.replayed_events for feed in every),
        ids_reused=counters.ids_reused,
        latency_buckets=latency.cumulative(),
        latency_sum=latency.sum,
        uptime_seconds=time.time() - broker.started_at,
        tasks=len(asyncio.all_tasks()),
        pid=os.getpid(),
        feeds=feeds,
        **_bus(broker),
        **_capture(broker),
    )


def _capture(broker: Broker) -> dict[str, Any]:
    """The capture slot, as the monitor last sampled it (`feeds/walcapture.py`). This
    process's own reader knows its lag in seconds exactly; another session's reader is not
    peeked (that would take the slot from it): seconds are null then."""
    capture = broker.capture
    if capture is None:
        return {}
    reading, lag = capture.claim.reading, capture.monitor.lag
    seconds: float | None
    if reading is not None:
        reader: str | None = "self"
        seconds = reading.lag_seconds()
    else:
        reader = None if lag is None or lag.active_pid is None else "other"
        seconds = None if lag is None else lag.seconds
    return {
        "capture_mode": "wal",
        "capture_slot": capture.claim.slot,
        "capture_lag_bytes": None if lag is None else lag.bytes,
        "capture_lag_seconds": None if seconds is None else round(seconds, 3),
        "capture_reader": reader,
    }


def _feed(open_streams: int, counters: HubCounters) -> FeedStats:
    return FeedStats(
        open_streams=open_streams,
        routed=counters.messages_routed,
        events_delivered=counters.events_delivered,
        replayed_events=counters.replayed_events,
        slow_consumer_disconnects=counters.slow_consumer_disconnects,
    )


def _listener(broker: Broker) -> dict[str, Any]:
    """This process's LISTEN connection. With a bus only the relay holds one: `connected` is
    true there alone, and the counters are its relay's (elections after the first count as
    reconnects)."""
    if broker.bus is None:
        listener = broker.listener
        return {
            "listener_connected": listener.connected,
            "listener_reconnects": listener.reconnects,
            "notifications": listener.notifications,
            "backfilled": listener.backfilled,
            "refused": listener.refused.count,
        }
    relay = broker.bus.relay
    return {
        "listener_connected": relay.listening,
        "listener_reconnects": max(0, relay.elections - 1),
        "notifications": relay.notifications,
        "backfilled": relay.backfilled,
        "refused": relay.refused.count + broker.bus.bus.refusals.count,
    }


def _bus(broker: Broker) -> dict[str, Any]:
    if broker.bus is None:
        return {}
    reader = broker.bus.reader
    return {
        "bus_role": broker.bus.relay.role,
        "bus_last_id": reader.last_id,
        "bus_lag_ms": round(reader.lag_ms, 3),
        "bus_lease_live": broker.bus.relay.lease_live,
        "bus_gaps": reader.gaps,
        "bus_takeovers": broker.bus.relay.takeovers,
    }
