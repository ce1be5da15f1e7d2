"""The bus: one Redis stream that carries every row, in one order, to every broker.

With `BROKER_BUS_URL`, the relay (`relay.py`) appends each row it gets from PostgreSQL with
`XADD ... MAXLEN ~ JOURNAL_SIZE`, the row's JSON as the trigger's notification has it; every
broker, the relay too, runs a `BusReader` that reads the stream with `XREAD BLOCK` and routes
each row into its hub. So every broker delivers in the stream's order, and its journal (hence
resume by `Last-Event-ID`) is that order too: the reader preloads the journal from the stream's
tail when it starts, so a broker that just started resumes exactly like one up for hours.

Redis errors are translated here, at the boundary, into `BusDown`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .backoff import Backoff
from .errors import BrokerError
from .events import Message, parse_notification
from .hub import JOURNAL_SIZE, Hub
from .retry import checkpoint, retry_forever

__all__ = ["Bus", "BusDown", "BusReader", "Entry"]

READ_BLOCK_MS = 1_000
READ_COUNT = 1_000
SOCKET_TIMEOUT = 5.0  # longer than READ_BLOCK_MS: a blocked XREAD is not a dead server

log = structlog.get_logger(logger_name="broker.bus")


class BusDown(BrokerError):
    """Redis did not answer (refused, reset, timed out, or an error reply)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: its stream id (`<ms>-<seq>`) and the row it carries."""

    stream_id: str
    message: Message

    @property
    def added_ms(self) -> int:
        """When Redis appended it, milliseconds since the epoch (the id's first part)."""
        return int(self.stream_id.split("-", 1)[0])


def encode_row(message: Message) -> bytes:
    """The row as the trigger's NOTIFY payload carries it (`events.parse_notification`)."""
    return orjson.dumps(message.as_json())


class Bus:
    """The stream `key` on the Redis at `url`. Every method raises `BusDown` on failure."""

    def __init__(self, url: str, key: str, maxlen: int = JOURNAL_SIZE) -> None:
        self.key = key
        self.maxlen = maxlen
        self._redis = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            # One retry on a new connection: a pooled one left from before a Redis restart
            # fails its first command. An XADD whose reply alone was lost may so be appended
            # twice; readers drop the second (the journal), so no client sees it twice.
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def append(self, message: Message) -> str:
        """XADD the row, trimming the stream to about `maxlen` entries; its stream id."""
        stream_id = await self._call(
            self._redis.xadd(
                self.key, {"row": encode_row(message)}, maxlen=self.maxlen, approximate=True
            )
        )
        return _text(stream_id)

    async def append_many(self, messages: list[Message]) -> None:
        """XADD each row, in order, in one pipeline: one round trip for the batch."""
        pipe = self._redis.pipeline(transaction=False)
        for message in messages:
            pipe.xadd(self.key, {"row": encode_row(message)}, maxlen=self.maxlen, approximate=True)
        await self._call(pipe.execute())

    async def length(self) -> int:
        """XLEN: the entries the stream holds now."""
        return int(await self._call(self._redis.xlen(self.key)))

    async def floor(self, proposed: int) -> int:
        """The bus's floor, set to `proposed` unless it is set already: the table's last id
        when the first relay of this stream LISTENed. Rows up to it predate the bus, and the
        relay's backfill looks for no row at or below it."""
        key = f"{self.key}:floor"
        await self._call(self._redis.set(key, proposed, nx=True))
        value = await self._call(self._redis.get(key))
        return int(value) if value is not None else proposed

    async def tail(self, count: int | None = None) -> list[Entry]:
        """The last `count` entries (default `maxlen`), oldest first."""
        raw = await self._call(self._redis.xrevrange(self.key, count=count or self.maxlen))
        return _entries(reversed(raw))

    async def read(self, after: str, block_ms: int = READ_BLOCK_MS) -> list[Entry]:
        """Entries after stream id `after`, waiting up to `block_ms` for the first one."""
        raw = await self._call(
            self._redis.xread({self.key: after}, count=READ_COUNT, block=block_ms)
        )
        return _entries(entry for _, entries in raw or [] for entry in entries)

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise BusDown(f"{type(exc).__name__}: {exc}".strip()) from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(raw: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> list[Entry]:
    entries = []
    for stream_id, fields in raw:
        try:
            parsed = parse_notification(fields[b"row"])
        except (KeyError, ValueError) as exc:
            log.error("bus_entry_malformed", stream_id=_text(stream_id), error=str(exc))
            continue
        if isinstance(parsed, Message):
            entries.append(Entry(_text(stream_id), parsed))
    return entries


class BusReader:
    """Routes what the stream carries into this broker's hub, in stream order.

    `connected` is what readiness reports with a bus; `last_id` is the last stream id read and
    `lag_ms` how long its entry took from XADD to here.
    """

    def __init__(self, bus: Bus, hub: Hub) -> None:
        self._bus = bus
        self._hub = hub
        self.last_id: str | None = None
        self.high_id: int | None = None  # the highest row id routed
        self.started = asyncio.Event()  # set at the first read, as the listener's first LISTEN
        self.lag_ms = 0.0
        self.connected = False
        self.entries = 0
        self.reconnects = 0

    async def run(self) -> None:
        """Read until cancelled, reconnecting with backoff after any Redis failure."""
        await retry_forever(
            self._read, self._set_down, expected=(BusDown,), crashed="bus_reader_crashed", log=log
        )

    def _set_down(self, exc: BaseException) -> None:
        if self.connected:
            log.warning("bus_down", error=str(exc))
        self.connected = False

    async def _read(self, backoff: Backoff) -> None:
        if self.last_id is None:
            self._preload(await self._bus.tail())
        else:
            await self._bus.ping()
            self.reconnects += 1
        self.connected = True
        self.started.set()
        backoff.reset()
        log.info("bus_up", stream=self._bus.key, last_id=self.last_id, reconnects=self.reconnects)
        while True:
            self.route(await self._bus.read(self.last_id or "0-0"))
            checkpoint()

    def _preload(self, entries: list[Entry]) -> None:
        """The journal from the stream's tail, so resume is exact from the first request."""
        journal = self._hub.journal
        for entry in entries:
            message = entry.message
            if message.id not in journal:
                journal.append(message.id, message.session_id, message.robot_id)
        self.last_id = entries[-1].stream_id if entries else "0-0"
        log.info("bus_preloaded", rows=len(entries), last_id=self.last_id)

    def route(self, entries: list[Entry]) -> None:
        """Publish each entry's row unless this hub delivered it already (a duplicate)."""
        hub = self._hub
        for entry in entries:
            if entry.message.id not in hub.journal:
                hub.publish(entry.message)
            self.last_id = entry.stream_id
            self.high_id = max(self.high_id or 0, entry.message.id)
            self.entries += 1
        if entries:
            self.lag_ms = max(0.0, time.time() * 1000 - entries[-1].added_ms)
