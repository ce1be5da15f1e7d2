"""The bus: one Redis stream that carries every row, in one order, to every broker.

With `BROKER_BUS_URL`, the relay (`relay.py`) appends each row it gets from PostgreSQL with
`XADD ... MAXLEN ~ JOURNAL_SIZE`, the row's JSON as the trigger's notification has it; every
broker, the relay too, reads the stream with a `BusReader` (`busreader.py`) and routes each
row into its hub. This module owns the stream itself: appends, the floor of the relay's
backfill, reads and pages, and the relay's lease as the bus holds it (`Bus.lease`, `lease.py`).

Memory is bounded by bytes, not only by rows: the stream is trimmed to `max_bytes`
(`BROKER_BUS_MAX_BYTES`) besides `maxlen` entries, and every read asks for a page sized from the
entries' measured size so that one reply holds about `PAGE_BYTES` (`Pager`): 300 rows of 1 MiB
no longer arrive in one reply.

Redis errors are translated here, at the boundary, into `BusDown` (`Bus.call`); their text
never holds the URL's password (redis-py names only host and port).

Nothing read from Redis is trusted: anyone who can write to it can `XADD`. An entry
is `{"row": <signed payload>, "db": <database>}`: the payload as the trigger signs it
(`signing.py`; the relay forwards the trigger's own, or signs a row it read from the table),
and the database it belongs to. A read returns an entry only if it names this broker's
database, its signature verifies with that database's key and its row is well typed; any
other is refused (counted, logged at most once a second, without its content) and the read
position moves past it all the same, so a bad entry at the tail cannot hold a reader in a
loop. Two deployments that share a Redis stream so each ignore the other's rows. Changes of
declared feeds travel the same way, in the same order as rows (`buschanges.py`).

An entry with the largest possible stream id makes every later `XADD *` fail and leaves every
reader's position past anything the stream can hold. The relay finds it (`exhausted`), says
so (`bus_stream_exhausted`), deletes the stream and appends again what readers may lack; the
readers start again from the stream's start (`busreader.py`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..errors import BrokerError
from ..events import Message, parse_notification
from ..hub import JOURNAL_SIZE
from ..log import Refusals
from ..signing import RowKey, refusal_reason
from .buschanges import ChangeEntry, parse_entry
from .lease import Lease
from .source import CHANGE_PREFIX

__all__ = ["Bus", "BusDown", "Entry", "Pager", "Sizes", "encode_row"]

READ_BLOCK_MS = 1_000
READ_COUNT = 1_000  # entries a read asks for, at most
PAGE_BYTES = 4 * 1024 * 1024  # and about this many bytes (one entry at least)
FIRST_PAGE = 16  # entries asked for before any size is known
MAX_BYTES = 64 * 1024 * 1024  # BROKER_BUS_MAX_BYTES' default: the stream's byte budget
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
# The WAL mark, set only while ARGV[2] holds the relay's lease (KEYS[2]): a relay frozen past
# its lease that wakes mid-drain cannot write a mark over a new relay's backfill.
_MARK = """
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
"""
SIZES_PAGE = 100  # entries a `_SIZES` call reads: Redis runs a script without a break


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
        self._sizes = self._redis.register_script(_SIZES)
        self._mark = self._redis.register_script(_MARK)
        self.lease_key = f"{key}:relay"

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> None:
        await self.call(self._redis.ping())

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
        replies = await self.call(pipe.execute())
        return [_text(stream_id) for stream_id in replies[: len(entries)]]

    async def identity(self) -> str:
        """The bus's identity: a random id the first broker to ask keeps in Redis (`:id`).
        Two deployments on one database with the same stream key on different Redis servers
        have different ones (so different relay locks); a Redis that lost its data gets a new
        one."""
        key = f"{self.key}:id"
        await self.call(self._redis.set(key, uuid.uuid4().hex, nx=True))
        value = await self.call(self._redis.get(key))
        if value is None:
            raise BusDown(f"{key} vanished")
        return _text(value)

    @asynccontextmanager
    async def lease(self, token: str) -> AsyncIterator[Lease]:
        """Take the relay's lease, `token` under `lease_key` for `lease.LEASE_MS`, on a Redis
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
        """The live lease's token, None when no relay renewed it within `lease.LEASE_MS`."""
        value = await self.call(self._redis.get(self.lease_key))
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
        await self.call(self._redis.delete(self.key))

    async def top(self) -> str | None:
        """The stream id of the last entry, None when the stream is empty or gone."""
        raw = await self.call(self._redis.xrevrange(self.key, count=1))
        return _text(raw[0][0]) if raw else None

    async def length(self) -> int:
        """XLEN: the entries the stream holds now."""
        return int(await self.call(self._redis.xlen(self.key)))

    async def floor(self, proposed: int, feed: str = "") -> int:
        """The bus's floor, set to `proposed` unless it is set already: the table's last id
        when the first relay of this stream LISTENed. Rows up to it predate the bus, and the
        relay's backfill looks for no row at or below it. With `feed`, that feed's floor of
        change positions."""
        key = self._floor_key() + (f":{feed}" if feed else "")
        await self.call(self._redis.set(key, proposed, nx=True))
        value = await self.call(self._redis.get(key))
        return int(value) if value is not None else proposed

    async def set_floor(self, value: int) -> None:
        """Set the bus's floor (`floor`) to `value`, whatever it was."""
        await self.call(self._redis.set(self._floor_key(), value))

    async def wal_mark(self) -> int | None:
        """The WAL position through which the stream holds every transaction of the capture
        slot (`set_wal_mark`), None when none is known."""
        value = await self.call(self._redis.get(self._wal_mark_key()))
        return None if value is None else int(value)

    async def set_wal_mark(self, lsn: int | None, holder: str | None = None) -> bool:
        """Say that the stream holds every transaction committed through `lsn` (the relay, once
        Redis took them, before the slot moves past them); None: nothing known (deleted,
        whoever asks). With `holder`, the mark is set only while `holder` is the lease's token:
        False when it is not (the relay lost its role)."""
        key = self._wal_mark_key()
        if lsn is None:
            await self.call(self._redis.delete(key))
            return True
        if holder is None:
            await self.call(self._redis.set(key, lsn))
            return True
        return bool(await self.call(self._mark(keys=[key, self.lease_key], args=[lsn, holder])))

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
                raw = await self.call(self._sizes(keys=[self.key], args=[end, page], client=client))
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
            raw = await self.call(
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
        raw, first = await self.call(pipe.execute())
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

    async def call(self, awaitable: Awaitable[Any]) -> Any:
        """Await a Redis command on the bus; any failure raises `BusDown`."""
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise BusDown(f"{type(exc).__name__}: {exc}".strip()) from None


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
