"""The bus: one Redis stream that carries every row, in one order, to every broker.

With `BROKER_BUS_URL`, the relay (`relay.py`) appends each row it gets from PostgreSQL with
`XADD ... MAXLEN ~ JOURNAL_SIZE`, the row's JSON as the trigger's notification has it; every
broker, the relay too, runs a `BusReader` that reads the stream with `XREAD BLOCK` and routes
each row into its hub. So every broker delivers in the stream's order, and its journal (hence
resume by `Last-Event-ID`) is that order too: the reader preloads the journal from the stream's
tail when it starts, so a broker that just started resumes exactly like one up for hours.

Redis errors are translated here, at the boundary, into `BusDown`.

Nothing read from Redis is trusted (issue 20): anyone who can write to it can `XADD`. An entry
is `{"row": <signed payload>, "db": <database>}`: the payload as the trigger signs it
(`signing.py`; the relay forwards the trigger's own, or signs a row it read from the table),
and the database it belongs to. A reader routes an entry only if it names this broker's
database, its signature verifies with that database's key and its row is well typed; any
other is refused (counted, logged at most once a second, without its content) and the read
position moves past it all the same, so a bad entry at the tail cannot hold a reader in a
loop. Two deployments that share a Redis stream so each ignore the other's rows.

An entry with the largest possible stream id makes every later `XADD *` fail and leaves every
reader's position past anything the stream can hold. The relay finds it (`exhausted`), says
so (`bus_stream_exhausted`), deletes the stream and appends again what readers may lack; a
reader whose position is past the stream's last entry (it finds out when a read waits in
vain) starts again from the stream's start, its journal dropping what it routed already.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from .backoff import Backoff
from .errors import BrokerError
from .events import Message, parse_notification
from .hub import JOURNAL_SIZE, Hub
from .retry import checkpoint, retry_forever
from .signing import Refusals, RowKey
from .store import DatabaseUnavailable

__all__ = ["Bus", "BusDown", "BusReader", "Entry"]

READ_BLOCK_MS = 1_000
READ_COUNT = 1_000
LAST_POSSIBLE_ID = "18446744073709551615-18446744073709551615"
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
        self.row_key: RowKey | None = None  # the database's key (`trust`)
        self.refusals = Refusals(log, "bus_entry_refused")
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

    def trust(self, row_key: RowKey) -> None:
        """Sign and verify entries with the database's key from now on."""
        self.row_key = row_key

    def _fields(self, row: Message | bytes) -> dict[Any, Any]:
        """An entry's fields: a `Message` is signed here, bytes are a payload signed already
        (the trigger's notification, forwarded as is)."""
        row_key = self._key()
        signed = row if isinstance(row, bytes) else row_key.sign(encode_row(row))
        return {"row": signed, "db": row_key.database.encode()}

    def _key(self) -> RowKey:
        if self.row_key is None:
            raise BusDown("no database key loaded yet")
        return self.row_key

    async def append(self, row: Message | bytes) -> str:
        """XADD the row, trimming the stream to about `maxlen` entries; its stream id."""
        stream_id = await self._call(
            self._redis.xadd(self.key, self._fields(row), maxlen=self.maxlen, approximate=True)
        )
        return _text(stream_id)

    async def append_many(self, rows: Sequence[Message | bytes]) -> None:
        """XADD each row, in order, in one pipeline: one round trip for the batch."""
        pipe = self._redis.pipeline(transaction=False)
        for row in rows:
            pipe.xadd(self.key, self._fields(row), maxlen=self.maxlen, approximate=True)
        await self._call(pipe.execute())

    async def exhausted(self) -> bool:
        """Whether the stream's last id is the largest possible one (a forged entry): no
        `XADD *` can follow it."""
        try:
            info = await self._redis.xinfo_stream(self.key)
        except ResponseError:  # no such key
            return False
        except (RedisError, OSError) as exc:
            raise BusDown(f"{type(exc).__name__}: {exc}".strip()) from None
        return _text(info["last-generated-id"]) == LAST_POSSIBLE_ID

    async def delete(self) -> None:
        """DEL the stream (after `exhausted`): the relay then appends what readers lack."""
        await self._call(self._redis.delete(self.key))

    async def top(self) -> str | None:
        """The stream id of the last entry, None when the stream is empty or gone."""
        raw = await self._call(self._redis.xrevrange(self.key, count=1))
        return _text(raw[0][0]) if raw else None

    async def length(self) -> int:
        """XLEN: the entries the stream holds now."""
        return int(await self._call(self._redis.xlen(self.key)))

    async def floor(self, proposed: int) -> int:
        """The bus's floor, set to `proposed` unless it is set already: the table's last id
        when the first relay of this stream LISTENed. Rows up to it predate the bus, and the
        relay's backfill looks for no row at or below it."""
        key = self._floor_key()
        await self._call(self._redis.set(key, proposed, nx=True))
        value = await self._call(self._redis.get(key))
        return int(value) if value is not None else proposed

    async def set_floor(self, value: int) -> None:
        """Set the bus's floor (`floor`) to `value`, whatever it was."""
        await self._call(self._redis.set(self._floor_key(), value))

    def _floor_key(self) -> str:
        return f"{self.key}:floor:{self._key().database}"  # per database: streams may be shared

    async def tail(self, count: int | None = None) -> list[Entry]:
        """The last `count` entries (default `maxlen`) this database signed, oldest first."""
        raw = await self._call(self._redis.xrevrange(self.key, count=count or self.maxlen))
        return self._entries(reversed(raw))[0]

    async def read(self, after: str, block_ms: int = READ_BLOCK_MS) -> tuple[list[Entry], str]:
        """Entries after stream id `after` that this database signed, waiting up to
        `block_ms` for the first one; and the id of the last entry read, refused or not
        (`after` if none), where the next read starts."""
        raw = await self._call(
            self._redis.xread({self.key: after}, count=READ_COUNT, block=block_ms)
        )
        return self._entries((entry for _, entries in raw or [] for entry in entries), after)

    def _entries(
        self, raw: Iterable[tuple[bytes, dict[bytes, bytes]]], last: str = "0-0"
    ) -> tuple[list[Entry], str]:
        """The entries of `raw` that verify, and the id of the last of `raw`."""
        row_key = self._key()
        database = row_key.database.encode()
        entries = []
        for raw_id, fields in raw:
            last = _text(raw_id)
            if fields.get(b"db") != database:
                self.refusals.add(stream_id=last, reason="another database")
                continue
            try:
                parsed = parse_notification(row_key.verify(fields.get(b"row", b"")))
            except ValueError as exc:  # BadSignature too
                self.refusals.add(stream_id=last, reason=str(exc))
                continue
            if isinstance(parsed, Message):
                entries.append(Entry(last, parsed))
        return entries, last

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise BusDown(f"{type(exc).__name__}: {exc}".strip()) from None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _stream_id(text: str) -> tuple[int, int]:
    """`<ms>-<seq>` as a pair that compares as Redis orders ids."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class BusReader:
    """Routes what the stream carries into this broker's hub, in stream order.

    `connected` is what readiness reports with a bus; `last_id` is the last stream id read and
    `lag_ms` how long its entry took from XADD to here.
    """

    def __init__(
        self, bus: Bus, hub: Hub, load_key: Callable[[], Awaitable[RowKey]] | None = None
    ) -> None:
        self._bus = bus
        self._hub = hub
        self._load_key = load_key  # None: the bus's key is set already (`Bus.trust`)
        self.resets = 0  # positions found past the stream's end (`bus_position_reset`)
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
            self._read,
            self._set_down,
            expected=(BusDown, DatabaseUnavailable),
            crashed="bus_reader_crashed",
            log=log,
        )

    def _set_down(self, exc: BaseException) -> None:
        if self.connected:
            log.warning("bus_down", error=str(exc))
        self.connected = False

    async def _read(self, backoff: Backoff) -> None:
        if self._load_key is not None:
            self._bus.trust(await self._load_key())
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
            entries, self.last_id = await self._bus.read(self.last_id or "0-0")
            self.route(entries)
            if not entries:
                await self._check_position()
            checkpoint()

    async def _check_position(self) -> None:
        """A read that waited in vain: if the position is past the stream's last entry (the
        stream was deleted and made again, after an entry with the largest possible id), read
        again from its start; the journal drops the rows routed already."""
        if self.last_id in (None, "0-0"):
            return
        top = await self._bus.top()
        if top is None or _stream_id(top) < _stream_id(self.last_id or "0-0"):
            self.resets += 1
            log.error("bus_position_reset", position=self.last_id, stream_top=top)
            self.last_id = "0-0"

    def _preload(self, entries: list[Entry]) -> None:
        """The journal from the stream's tail, so resume is exact from the first request."""
        journal = self._hub.journal
        for entry in entries:
            message = entry.message
            if message.id not in journal:
                journal.append(message.id, message.session_id, message.robot_id, message.created_at)
        self.last_id = entries[-1].stream_id if entries else "0-0"
        log.info("bus_preloaded", rows=len(entries), last_id=self.last_id)

    def route(self, entries: list[Entry]) -> None:
        """Publish each entry's row unless this hub delivered it already (a duplicate)."""
        hub = self._hub
        for entry in entries:
            if hub.is_new(entry.message):
                hub.publish(entry.message)
            self.last_id = entry.stream_id
            self.high_id = max(self.high_id or 0, entry.message.id)
            self.entries += 1
        if entries:
            self.lag_ms = max(0.0, time.time() * 1000 - entries[-1].added_ms)
