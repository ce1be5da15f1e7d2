"""The bus: one Redis stream that carries every row, in one order, to every broker.

With `BROKER_BUS_URL`, the relay (`relay.py`) appends each row it gets from PostgreSQL with
`XADD ... MAXLEN ~ JOURNAL_SIZE`, the row's JSON as the trigger's notification has it; every
broker, the relay too, runs a `BusReader` that reads the stream with `XREAD BLOCK` and routes
each row into its hub. So every broker delivers in the stream's order, and its journal (hence
resume by `Last-Event-ID`) is that order too: the reader preloads the journal from the stream's
tail when it starts, so a broker that just started resumes exactly like one up for hours.

Memory is bounded by bytes, not only by rows: the stream is trimmed to `max_bytes`
(`BROKER_BUS_MAX_BYTES`) besides `maxlen` entries, and every read asks for a page sized from the
entries' measured size so that one reply holds about `PAGE_BYTES` (`Pager`): 300 rows of 1 MiB
no longer arrive in one reply. A reader that fell so far behind that the stream was trimmed past
its position (a gap) cannot know what it missed: it ends every stream with an `error` event and
forgets its journal, so clients resume by id from the table (`BusReader._gap`).

Redis errors are translated here, at the boundary, into `BusDown`; their text never holds the
URL's password (redis-py names only host and port).

Nothing read from Redis is trusted: anyone who can write to it can `XADD`. An entry
is `{"row": <signed payload>, "db": <database>}`: the payload as the trigger signs it
(`signing.py`; the relay forwards the trigger's own, or signs a row it read from the table),
and the database it belongs to. A reader routes an entry only if it names this broker's
database, its signature verifies with that database's key and its row is well typed; any
other is refused (counted, logged at most once a second, without its content) and the read
position moves past it all the same, so a bad entry at the tail cannot hold a reader in a
loop. Two deployments that share a Redis stream so each ignore the other's rows. Changes of
declared feeds travel the same way, in the same order as rows (`buschanges.py`).

An entry with the largest possible stream id makes every later `XADD *` fail and leaves every
reader's position past anything the stream can hold. The relay finds it (`exhausted`), says
so (`bus_stream_exhausted`), deletes the stream and appends again what readers may lack; a
reader whose position is past the stream's last entry (it finds out when a read waits in
vain) starts again from the stream's start, its journal dropping what it routed already.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..changes import Change
from ..errors import BrokerError
from ..events import Message, parse_notification
from ..hub import JOURNAL_SIZE, Hub
from ..journal import Journal
from ..log import Refusals
from ..signing import RowKey, refusal_reason
from ..store import DatabaseUnavailable
from .backoff import Backoff
from .buschanges import ChangeEntry, parse_entry
from .retry import checkpoint, retry_forever
from .source import CHANGE_PREFIX

if TYPE_CHECKING:
    from ..feedset import FeedSet

__all__ = ["Bus", "BusDown", "BusReader", "Entry", "Lease"]

READ_BLOCK_MS = 1_000
READ_COUNT = 1_000  # entries a read asks for, at most
PAGE_BYTES = 4 * 1024 * 1024  # and about this many bytes (one entry at least)
FIRST_PAGE = 16  # entries asked for before any size is known
MAX_BYTES = 64 * 1024 * 1024  # BROKER_BUS_MAX_BYTES' default: the stream's byte budget
LEASE_MS = 3_000  # the relay's lease (`Bus.lease`) lapses this long after its renewal
GAP = "missed rows on the bus: reconnect to resume"
LAST_POSSIBLE_ID = "18446744073709551615-18446744073709551615"
SOCKET_TIMEOUT = 5.0  # longer than READ_BLOCK_MS: a blocked XREAD is not a dead server

log = structlog.get_logger(logger_name=__name__)


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


# The stream's first entry id, without sending the entry itself (it may be a MiB).
_FIRST_ID = """
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first then return first[1] end
return false
"""
# Each entry's id and size (its fields' values, as `_size`), newest first, from ARGV[1] back,
# at most ARGV[2]: without the entries themselves (`Bus.sizes_through`).
_SIZES = """
local out = {}
for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], ARGV[1], '-', 'COUNT', ARGV[2])) do
  local size = 0
  for i = 2, #entry[2], 2 do size = size + #entry[2][i] end
  out[#out + 1] = entry[1]
  out[#out + 1] = size
end
return out
"""
SIZES_PAGE = 100  # entries a `_SIZES` call reads: Redis runs a script without a break
# Extend the lease only while it is still ours: a relay frozen past its lease must not take it
# back from the broker that took over.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def encode_row(message: Message) -> bytes:
    """The row as the trigger's NOTIFY payload carries it (`events.parse_notification`)."""
    return orjson.dumps(message.as_json())


class Pager:
    """How many entries to ask for so that a reply holds about `PAGE_BYTES`: from the mean
    size of the entries read so far (rows of 1 MiB get pages of 4, rows of 1 KiB of 1,000)."""

    def __init__(self) -> None:
        self.count = FIRST_PAGE

    def measured(self, entries: int, size: int) -> None:
        if entries:
            self.count = max(1, min(READ_COUNT, PAGE_BYTES * entries // max(size, 1)))


class Sizes:
    """What the stream holds, in bytes, as its appender knows it: the size of each entry, oldest
    first, from the relay's reading of the stream when it took the role and its appends since.
    `keep()` says how many entries to keep (XTRIM MAXLEN) so that the stream stays within
    `budget` bytes, the newest entry always kept."""

    def __init__(self, budget: int, maxlen: int) -> None:
        self.budget = budget
        self.maxlen = maxlen
        self._sizes: deque[int] = deque()
        self.total = 0

    def reset(self, sizes_oldest_first: Iterable[int]) -> None:
        self._sizes.clear()
        self.total = 0
        self.add(sizes_oldest_first)

    def add(self, sizes: Iterable[int]) -> None:
        for size in sizes:
            self._sizes.append(size)
            self.total += size
        while len(self._sizes) > self.maxlen:  # XADD's own MAXLEN trims these
            self.total -= self._sizes.popleft()

    def add_older(self, sizes_newest_first: Iterable[int]) -> None:
        """Sizes of entries older than every one known, newest first (a relay that took the
        role without reading the stream learns them after its first appends); within
        `maxlen`, as `add`."""
        for size in sizes_newest_first:
            if len(self._sizes) >= self.maxlen:
                return
            self._sizes.appendleft(size)
            self.total += size

    def keep(self) -> int | None:
        """Drop the oldest sizes until within budget; the entries to keep, None if all."""
        dropped = 0
        while self.total > self.budget and len(self._sizes) > 1:
            self.total -= self._sizes.popleft()
            dropped += 1
        return len(self._sizes) if dropped else None


class Bus:
    """The stream `key` on the Redis at `url`. Every method raises `BusDown` on failure.

    `url` may carry credentials (`redis://user:password@host:port/db`) and ask for TLS
    (`rediss://`, with `ssl_ca_certs=` and `ssl_cert_reqs=` in its query string, as redis-py
    reads them).
    """

    def __init__(
        self, url: str, key: str, maxlen: int = JOURNAL_SIZE, max_bytes: int = MAX_BYTES
    ) -> None:
        self.key = key
        self.maxlen = maxlen
        self.sizes = Sizes(max_bytes, maxlen)
        self.row_key: RowKey | None = None  # the database's key (`trust`)
        self.refusals = Refusals(log)  # forged, foreign or malformed entries
        self._url = url
        self._redis = _client(url)
        self._renew = self._redis.register_script(_RENEW)
        self._sizes = self._redis.register_script(_SIZES)
        self.lease_key = f"{key}:relay"

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
        return (await self.append_many([row]))[0]

    async def append_many(self, rows: Sequence[Message | bytes]) -> list[str]:
        """XADD each row, in order, in one pipeline: one round trip for the batch; then trim
        the stream to its byte budget (`sizes`) in the same pipeline. Their stream ids."""
        pipe = self._redis.pipeline(transaction=False)
        entries = [self._fields(row) for row in rows]
        for fields in entries:
            pipe.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
        self.sizes.add(_size(fields) for fields in entries)
        keep = self.sizes.keep()
        if keep is not None:
            pipe.xtrim(self.key, maxlen=keep, approximate=False)
        replies = await self._call(pipe.execute())
        return [_text(stream_id) for stream_id in replies[: len(entries)]]

    async def identity(self) -> str:
        """The bus's identity: a random id the first broker to ask keeps in Redis (`:id`).
        Two deployments on one database with the same stream key on different Redis servers
        have different ones (so different relay locks); a Redis that lost its data gets a new
        one."""
        key = f"{self.key}:id"
        await self._call(self._redis.set(key, uuid.uuid4().hex, nx=True))
        value = await self._call(self._redis.get(key))
        if value is None:
            raise BusDown(f"{key} vanished")
        return _text(value)

    @asynccontextmanager
    async def lease(self, token: str) -> AsyncIterator[Lease]:
        """Take the relay's lease, `token` under `lease_key` for `LEASE_MS`, on a Redis
        connection of its own that lasts as long as the role and is closed with it.

        Its own, because the pool keeps every connection it ever opened: a renewal that
        overlapped an append and the reader's XREAD opened a third one, kept after the
        role was gone, so a broker held two Redis connections or three depending on its
        past (the wal soak's "descriptors off the start"). So a follower holds two (the
        reader's XREAD, the campaign's polls) and the relay three (the reader, its appends,
        its lease), in any order of roles; and a renewal never waits for a pooled connection
        behind a batch's pipeline."""
        client = _client(self._url, single_connection_client=True)
        try:
            lease = Lease(self, client, token)
            await lease.renew(take=True)
            yield lease
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def lease_holder(self) -> str | None:
        """The live lease's token, None when no relay renewed it within `LEASE_MS`."""
        value = await self._call(self._redis.get(self.lease_key))
        return None if value is None else _text(value)

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

    async def floor(self, proposed: int, feed: str = "") -> int:
        """The bus's floor, set to `proposed` unless it is set already: the table's last id
        when the first relay of this stream LISTENed. Rows up to it predate the bus, and the
        relay's backfill looks for no row at or below it. With `feed`, that feed's floor of
        change positions."""
        key = self._floor_key() + (f":{feed}" if feed else "")
        await self._call(self._redis.set(key, proposed, nx=True))
        value = await self._call(self._redis.get(key))
        return int(value) if value is not None else proposed

    async def set_floor(self, value: int) -> None:
        """Set the bus's floor (`floor`) to `value`, whatever it was."""
        await self._call(self._redis.set(self._floor_key(), value))

    async def wal_mark(self) -> int | None:
        """The WAL position through which the stream holds every transaction of the capture
        slot (`set_wal_mark`), None when none is known."""
        value = await self._call(self._redis.get(self._wal_mark_key()))
        return None if value is None else int(value)

    async def set_wal_mark(self, lsn: int | None) -> None:
        """Say that the stream holds every transaction committed through `lsn` (the relay, once
        Redis took them, before the slot moves past them); None: nothing known (deleted)."""
        key = self._wal_mark_key()
        await self._call(self._redis.delete(key) if lsn is None else self._redis.set(key, lsn))

    def _wal_mark_key(self) -> str:
        return f"{self.key}:wal:{self._key().database}"  # not under :floor: (a feed's floor)

    async def sizes_through(self, stream_id: str) -> AsyncIterator[list[int]]:
        """The sizes of the last `maxlen` entries up to `stream_id`, newest first, a page at a
        time, read in Redis (the entries never leave it), on a connection of its own closed
        after (the relay appends meanwhile: the pool keeps every connection it opens)."""
        client = _client(self._url, single_connection_client=True)
        pager = Pager()  # the script copies the entries it reads: pages of about PAGE_BYTES
        try:
            left, end = self.maxlen, stream_id
            while left > 0:
                page = min(left, pager.count, SIZES_PAGE)
                raw = await self._call(
                    self._sizes(keys=[self.key], args=[end, page], client=client)
                )
                if not raw:
                    return
                sizes = [int(size) for size in raw[1::2]]
                pager.measured(len(sizes), sum(sizes))
                left -= len(sizes)
                end = "(" + _text(raw[-2])
                yield sizes
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def _floor_key(self) -> str:
        return f"{self.key}:floor:{self._key().database}"  # per database: streams may be shared

    async def tail(self, count: int | None = None) -> list[Entry | ChangeEntry]:
        """The last `count` entries (default `maxlen`) this database signed, oldest first.
        Holds them all: for tests and small counts; `pages` reads in bounded memory."""
        entries = [entry async for page in self.pages(count) for entry, _ in page]
        return entries[::-1]

    async def pages(
        self, count: int | None = None
    ) -> AsyncIterator[list[tuple[Entry | ChangeEntry, int]]]:
        """The last `count` entries (default `maxlen`) this database signed, newest first, a
        bounded page at a time, each with its size in bytes."""
        left = count or self.maxlen
        pager = Pager()
        end = "+"
        while left > 0:
            raw = await self._call(
                self._redis.xrevrange(self.key, max=end, count=min(left, pager.count))
            )
            if not raw:
                return
            pager.measured(len(raw), sum(_size(fields) for _, fields in raw))
            left -= len(raw)
            end = "(" + _text(raw[-1][0])
            yield self._verified(raw)[0]

    async def read(
        self, after: str, block_ms: int = READ_BLOCK_MS, pager: Pager | None = None
    ) -> tuple[list[Entry | ChangeEntry], str, str | None]:
        """Entries after stream id `after` that this database signed, waiting up to
        `block_ms` for the first one; the id of the last entry read, refused or not (`after`
        if none), where the next read starts; and the stream's first id once they were read
        (None if empty): a first id above `after` means entries after `after` may have been
        trimmed unread."""
        pager = pager or Pager()
        pipe = self._redis.pipeline(transaction=False)
        pipe.xread({self.key: after}, count=pager.count, block=block_ms)
        pipe.eval(_FIRST_ID, 1, self.key)  # a hundred bytes; Redis caches it compiled
        raw, first = await self._call(pipe.execute())
        pairs = [entry for _, entries in raw or [] for entry in entries]
        pager.measured(len(pairs), sum(_size(fields) for _, fields in pairs))
        verified, last = self._verified(pairs, after)
        return [entry for entry, _ in verified], last, None if first is None else _text(first)

    def _verified(
        self, raw: Iterable[tuple[bytes, dict[bytes, bytes]]], last: str = "0-0"
    ) -> tuple[list[tuple[Entry | ChangeEntry, int]], str]:
        """The entries of `raw` that verify, each with its size, and the id of the last of
        `raw`."""
        row_key = self._key()
        database = row_key.database.encode()
        entries: list[tuple[Entry | ChangeEntry, int]] = []
        for raw_id, fields in raw:
            last = _text(raw_id)
            if fields.get(b"db") != database:
                self.refusals.error("bus_entry_refused", "another database", stream_id=last)
                continue
            try:
                verified = row_key.verify(fields.get(b"row", b""))
                if verified.startswith(CHANGE_PREFIX):
                    entries.append((parse_entry(last, verified), _size(fields)))
                    continue
                parsed = parse_notification(verified)
            except ValueError as exc:  # BadSignature too
                self.refusals.error(
                    "bus_entry_refused", refusal_reason(exc), stream_id=last, error=str(exc)
                )
                continue
            if isinstance(parsed, Message):
                entries.append((Entry(last, parsed), _size(fields)))
        return entries, last

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise BusDown(f"{type(exc).__name__}: {exc}".strip()) from None


class Lease:
    """The relay's lease on its own connection (`Bus.lease`)."""

    def __init__(self, bus: Bus, client: redis.asyncio.Redis, token: str) -> None:
        self._bus = bus
        self._client = client
        self.token = token

    async def renew(self, take: bool = False) -> bool:
        """Extend the lease if it is still this token's (False if it expired or passed on);
        with `take`, set it whoever held it."""
        key = self._bus.lease_key
        if take:
            return bool(await self._bus._call(self._client.set(key, self.token, px=LEASE_MS)))
        renew = self._bus._renew(keys=[key], args=[self.token, LEASE_MS], client=self._client)
        return bool(await self._bus._call(renew))


def _client(url: str, **options: Any) -> redis.asyncio.Redis:
    """A Redis client for the bus at `url`; `options` add to redis-py's."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        # One retry on a new connection: a pooled one left from before a Redis restart
        # fails its first command. An XADD whose reply alone was lost may so be appended
        # twice; readers drop the second (the journal), so no client sees it twice.
        retry=Retry(NoBackoff(), 1),
        decode_responses=False,
        **options,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _size(fields: dict[bytes, bytes]) -> int:
    return sum(len(value) for value in fields.values())


def stream_position(stream_id: str) -> tuple[int, int]:
    """A stream id as a comparable pair: `10-2` < `9-5` as text, not as ids."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class BusReader:
    """Routes what the stream carries into this broker's hub, in stream order.

    `connected` is what readiness reports with a bus; `last_id` is the last stream id read and
    `lag_ms` how long its entry took from XADD to here.
    """

    def __init__(
        self,
        bus: Bus,
        hub: Hub,
        load_key: Callable[[], Awaitable[RowKey]] | None = None,
        feeds: FeedSet | None = None,
    ) -> None:
        self._bus = bus
        self._hub = hub
        self._feeds = feeds  # where changes go; None: they are dropped
        self._load_key = load_key  # None: the bus's key is set already (`Bus.trust`)
        self.resets = 0  # positions found past the stream's end (`bus_position_reset`)
        self.last_id: str | None = None
        self.high_id: int | None = None  # the highest row id routed
        self.started = asyncio.Event()  # set at the first read, as the listener's first LISTEN
        self.lag_ms = 0.0
        self.connected = False
        self.entries = 0
        self.reconnects = 0
        self.gaps = 0  # times the stream was trimmed past this reader (`_gap`)

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
            await self._preload()
        else:
            await self._bus.ping()
            self.reconnects += 1
        self.connected = True
        self.started.set()
        backoff.reset()
        log.info("bus_up", stream=self._bus.key, last_id=self.last_id, reconnects=self.reconnects)
        pager = Pager()
        while True:
            after = self.last_id or "0-0"
            entries, self.last_id, first_id = await self._bus.read(after, pager=pager)
            if first_id is not None and after != "0-0" and _trimmed(after, first_id):
                self._gap(after, first_id)
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
        if top is None or stream_position(top) < stream_position(self.last_id or "0-0"):
            self.resets += 1
            log.error("bus_position_reset", position=self.last_id, stream_top=top)
            self.last_id = "0-0"

    async def _preload(self) -> None:
        """The journal from the stream's tail, so resume is exact from the first request; read
        a bounded page at a time, keeping only each row's routing keys."""
        rows: list[tuple[int, str, str | None, str]] = []
        last_id: str | None = None
        changes: list[Change] = []
        async for page in self._bus.pages():
            for entry, _ in page:
                last_id = last_id or entry.stream_id
                if isinstance(entry, ChangeEntry):
                    changes.append(entry.change)
                    continue
                message = entry.message
                rows.append((message.id, message.session_id, message.robot_id, message.created_at))
        if self._feeds is not None:
            for change in reversed(changes):
                self._feeds.remember(change)
        journal = self._hub.journal
        for message_id, session_id, robot_id, created_at in reversed(rows):
            if message_id not in journal:
                journal.append(message_id, session_id, robot_id, created_at)
        self.last_id = last_id or "0-0"
        log.info("bus_preloaded", rows=len(rows), last_id=self.last_id)

    def _gap(self, after: str, first_id: str) -> None:
        """The stream was trimmed past this reader's position: rows it never read are gone
        from the bus. They are in the table, so every stream is ended with an `error` event
        and the journal forgotten: each client resumes by id from the table (replay.py), which
        sends the rows it missed. Filling the gap here instead would mean reading an unknown
        number of rows in no known order while streams wait."""
        self.gaps += 1
        log.warning("bus_gap", last_id=after, first_id=first_id, streams=len(self._hub))
        self._hub.journal = Journal(JOURNAL_SIZE)
        if self._feeds is None:
            self._hub.close_all(GAP)
        else:
            self._feeds.forget_changes()
            self._feeds.close_all(GAP)

    def route(self, entries: list[Entry | ChangeEntry]) -> None:
        """Publish each entry's row or change (the hubs drop a copy of one routed already)."""
        publish = self._hub.publish
        for entry in entries:
            if type(entry) is Entry:
                publish(entry.message)
                self.high_id = max(self.high_id or 0, entry.message.id)
            elif self._feeds is not None and isinstance(entry, ChangeEntry):
                self._feeds.route(entry.change)
            self.last_id = entry.stream_id
            self.entries += 1
        if entries:
            self.lag_ms = max(0.0, time.time() * 1000 - entries[-1].added_ms)


def _trimmed(after: str, first_id: str) -> bool:
    """Whether entries after `after` may have been trimmed before this reader got them: the
    stream now starts above `after`. On the safe side: when only the entry at `after` itself
    went, nothing was lost, but that cannot be told apart without a round trip more; a reader
    that keeps up is never there (the newest entry is never trimmed)."""
    return stream_position(first_id) > stream_position(after)
