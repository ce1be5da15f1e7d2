"""The running broker: store, feeds, listener and heartbeat, as one async context manager.

`Broker.running(settings)` opens the pool, loads the feeds file (`BROKER_CONFIG`, checked
against the catalog: a mistake raises `ConfigError`; `serve` has checked it already, when it
migrated), starts the listener and heartbeat tasks and supervises them: a task that ends
unexpectedly is logged and restarted at once, never found only at exit. On exit every stream
gets an `error` event and the tasks are cancelled. Without a feeds file the broker serves the
messages feed alone, as before feeds, and reads nothing more at start-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import structlog

from .config import feeds as feedspec
from .config.settings import Settings
from .feedhub import FeedHub
from .feedreplay import FeedReplay
from .feeds import changelog
from .feeds.bus import Bus
from .feeds.busreader import BusReader
from .feeds.listener import Listener
from .feeds.relay import Relay
from .feeds.source import CONNECTION_FAILURES, dedicated_connection
from .feeds.walcapture import CaptureMonitor, SlotClaim
from .feedset import FeedSet
from .filters import Sessions
from .flusher import Flusher
from .hub import Hub
from .replay import Replay
from .store import Store
from .subscriber import Subscriber

__all__ = ["SHUTDOWN", "Broker"]

SHUTDOWN = "server shutting down: reconnect to resume"
RESTART_DELAY_SECONDS = 1.0
PRUNE_SECONDS = 300.0  # how often changes past BROKER_RETENTION are deleted
PRUNER_NAME = "pgsse-pruner"  # its connection, in pg_stat_activity

log = structlog.get_logger(logger_name=__name__)


class BusFeed:
    """With `BROKER_BUS_URL`: the bus, this broker's reader of it, and its relay campaign."""

    def __init__(
        self, settings: Settings, database_url: str, broker: Broker, claim: SlotClaim | None
    ) -> None:
        assert settings.bus_url is not None
        self.bus = Bus(settings.bus_url, settings.bus_stream, max_bytes=settings.bus_max_bytes)
        self.reader = BusReader(self.bus, broker.hub, broker.store.row_key, broker.feeds)
        self.relay = Relay(
            database_url,
            self.bus,
            broker.store,
            lambda: self.reader.high_id,
            broker.feeds.captured,
            claim,
        )


class Capture:
    """With `BROKER_CAPTURE=wal`: this process's claim on the slot (read by the listener, or
    by the relay with a bus) and the slot's lag monitor (`feeds/walcapture.py`)."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.claim = SlotClaim(database_url, settings.capture_slot, settings.max_row_bytes)
        self.monitor = CaptureMonitor(database_url, settings.capture_slot)


class Broker:
    """What the HTTP layer talks to: the hub, the store and the listener's state."""

    def __init__(
        self, settings: Settings, store: Store, feeds: Sequence[feedspec.Feed] = ()
    ) -> None:
        if settings.database_url is None:
            raise ValueError("settings.database_url must be resolved before the broker starts")
        self.settings = settings
        self.store = store
        self.hub = Hub(
            max_subscribers=settings.max_connections,
            queue_size=settings.queue_size,
            queue_bytes=settings.queue_bytes,
            max_row_bytes=settings.max_row_bytes,
        )
        self.capture: Capture | None = None
        if settings.capture == "wal":
            self.capture = Capture(settings, settings.database_url)
        claim = None if self.capture is None else self.capture.claim
        self.feeds = FeedSet(self.hub, feeds)
        # The messages feed logs its updates and deletes: replays merge them with its rows.
        self.message_changes = feedspec.MESSAGES in self.feeds.captured
        self.listener = Listener(
            settings.database_url,
            self.hub,
            store,
            self.feeds.route,
            self.feeds,
            self.feeds.captured,
            claim,
        )
        self.bus: BusFeed | None = None
        if settings.bus_url is not None:
            self.bus = BusFeed(settings, settings.database_url, self, claim)
        self.started_at = time.time()

    @property
    def started(self) -> asyncio.Event:
        """Set once rows flow in: the first LISTEN, or the bus's first read."""
        return self.listener.started if self.bus is None else self.bus.reader.started

    @property
    def ready(self) -> bool:
        """What `/readyz` reports: the listener, or with a bus Redis and PostgreSQL up and a
        live relay (its lease renewed: feeds/relay.py). With `BROKER_CAPTURE=wal` the listener
        is connected only while it reads the slot; with a bus, a follower also needs the
        slot read by someone (the relay) at the monitor's last sample."""
        if self.bus is None:
            return self.listener.connected
        relay = self.bus.relay
        if not (self.bus.reader.connected and relay.connected and relay.lease_live):
            return False
        if self.capture is None or relay.listening:
            return True
        return self.capture.monitor.reader_active

    @classmethod
    @asynccontextmanager
    async def running(cls, settings: Settings) -> AsyncIterator[Broker]:
        assert settings.database_url is not None
        declared: tuple[feedspec.Feed, ...] = ()
        if settings.config is not None:
            declared = await asyncio.to_thread(_load_feeds, settings.database_url, settings.config)
        async with Store.open(settings.database_url, max_row_bytes=settings.max_row_bytes) as store:
            broker = cls(settings, store, declared)
            flusher = Flusher(asyncio.get_running_loop(), broker.hub.counters.delivery_latency)
            broker.feeds.set_on_idle_ready(flusher.mark)
            if broker.bus is None:
                feeds = [("listener", broker.listener.run)]
            else:  # the relay feeds the bus; every broker reads it (feeds/relay.py, busreader.py)
                feeds = [("relay", broker.bus.relay.run), ("bus", broker.bus.reader.run)]
            if broker.capture is not None:
                feeds.append(("capture_monitor", broker.capture.monitor.run))
            if broker.feeds.captured:
                feeds.append(("pruner", broker._prune))
            tasks = [
                *(asyncio.create_task(broker._supervise(name, run)) for name, run in feeds),
                asyncio.create_task(broker._supervise("heartbeat", broker._heartbeat)),
            ]
            try:
                yield broker
            finally:
                broker.close_streams()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if broker.bus is not None:
                    await broker.bus.bus.close()

    def open_stream(
        self,
        sessions: Sessions,
        robot_id: str | None,
        *,
        last_event_id: int | None = None,
        history: int | None = None,
    ) -> tuple[Subscriber, Replay | None]:
        """Subscribe a new stream and plan its replay (resume or history), in one event-loop
        step. Raises `AtCapacity` at `max_connections`."""
        self.feeds.admit()
        subscriber = self.hub.subscribe(sessions, robot_id)
        replay = Replay.plan(
            self.hub,
            self.store,
            subscriber,
            last_event_id=last_event_id,
            history=history,
            limit=self.settings.replay_limit,
            changes=self.message_changes,
        )
        return subscriber, replay

    def open_feed_stream(
        self,
        feed: FeedHub,
        keys: tuple[str, ...] | None,
        filters: Mapping[str, str],
        *,
        last_event_id: int | None = None,
        history: int | None = None,
    ) -> tuple[Subscriber, FeedReplay | None]:
        """`open_stream` for a generic feed: subscribe a stream of `keys` (None: all) and
        `filters`, and plan its replay, in one event-loop step. Raises `AtCapacity` when the
        streams of every feed together are at `max_connections`."""
        self.feeds.admit()
        subscriber = feed.subscribe(keys, filters)
        replay = FeedReplay.plan(
            feed,
            self.store,
            subscriber,
            last_event_id=last_event_id,
            history=history,
            limit=self.settings.replay_limit,
        )
        return subscriber, replay

    def close_streams(self, reason: str = SHUTDOWN) -> None:
        """Send every stream an `error` event and end it, so clients move elsewhere."""
        if len(self.feeds):
            log.info("streams_closing", streams=len(self.feeds), reason=reason)
        self.feeds.close_all(reason)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            self.feeds.heartbeat()

    async def _prune(self) -> None:
        """Delete changes older than `BROKER_RETENTION`, at start and every `PRUNE_SECONDS`,
        on a connection of its own (opened each time: a backend held for a query every few
        minutes would be a waste). A failure is logged and tried again at the next round;
        several brokers may run this: one prunes at a time (`changelog.prune`)."""
        assert self.settings.database_url is not None
        while True:
            try:
                async with await dedicated_connection(
                    self.settings.database_url, PRUNER_NAME
                ) as conn:
                    await changelog.prune(conn, self.settings.retention)
            except CONNECTION_FAILURES as exc:
                log.warning("prune_failed", error=f"{type(exc).__name__}: {exc}".strip())
            await asyncio.sleep(PRUNE_SECONDS)

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await run()
                log.error("task_ended", task=name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task_crashed", task=name)
            await asyncio.sleep(RESTART_DELAY_SECONDS)


def _load_feeds(url: str, path: Path) -> tuple[feedspec.Feed, ...]:
    """The feeds of the file at `path`, checked against the database's catalog (blocking:
    run in a thread at start-up)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return feedspec.load(conn, path)
