"""Capture through the WAL (`BROKER_CAPTURE=wal`): no trigger on `messages`, no NOTIFY lock.

PostgreSQL serialises every committing transaction that called NOTIFY on one cluster-wide lock
held through its commit's WAL flush, so notifying writers cannot share a group commit (issue
23 measured 0.24-0.27 of the no-trigger INSERT rate at 16-32 writers). In this mode the
messages table has no trigger at all: its publication (`pgsse_capture`, inserts only) puts
its inserts in the logical decoding stream, and the built-in `pgoutput` plugin gives them
back as Relation and Insert messages, which `Decoder` turns into `Message`s: the committed
rows, in commit order, with nothing for the writer to build or sign (a signed trigger cost
the writers 0.29 of their rate, docs/capture.md). The feeds' changes still come as signed
transactional logical messages (`messages 'true'`, prefix `pgsse_changes`), and so would a
messages trigger left from an older migration (prefix `pgsse_messages`).

psycopg 3 has no replication-protocol API, so the reader polls over SQL: one query peeks
(`pg_logical_slot_peek_binary_changes`) up to the WAL flushed when it started, and the slot is
advanced (`pg_replication_slot_advance`) only when the caller `confirm`s that it handed the
batch on. A reader killed before confirming loses nothing: the next one peeks the same batch
again. After a confirm that batch never comes again. An empty poll is one query; when other
tables' writes moved the WAL on by 64 kB meanwhile, the slot is advanced past them, so no
peek decodes the same unrelated WAL again and again.

The slot and its publication are made by `pgsse migrate` and dropped by `pgsse migrate
--drop-capture` (`slots.py`, which also says what a forgotten slot costs).
"""

from __future__ import annotations

import asyncio
import datetime
import struct
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import errors

from ..events import Message, Reference, cut_content, utc_timestamp
from ..slots import MESSAGES_TABLE, PREFIX, PUBLICATION, SlotBusy, SlotInvalidated, SlotMissing
from ..store import DEFAULT_MAX_ROW_BYTES

__all__ = [
    "STREAM_OPTIONS",
    "Decoder",
    "Item",
    "SlotLag",
    "SlotReader",
    "Transaction",
    "decode",
    "format_lsn",
    "iso_utc",
    "parse_lsn",
    "slot_error",
    "slot_lag",
]

POLL_SECONDS = 0.01
MAX_CHANGES = 10_000  # pgoutput rows per peek at most (it stops at the next commit after it)
# WAL grown since the last running-transactions record (`_log_snapshot`), or since an empty
# poll last moved the slot on
SNAPSHOT_BYTES = 65_536
PG_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
# The session settings pgoutput's text output of a row is written in (`Decoder`): the
# walsender's, or the peeking session's; `created_at` as `2026-12-07 18:03:00.123+00`.
STREAM_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO -c client_encoding=UTF8"

Item = str | Message | Reference  # a signed payload, or a row decoded from the WAL

log = structlog.get_logger(logger_name=__name__)


# -- pgoutput -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transaction:
    """One committed transaction's items and where it ends in the WAL: the payloads of its
    logical messages with one of the decoder's prefixes (signed, as NOTIFY payloads are) and
    its inserts into `messages` (`Message`, or a `Reference` for a row read back from the
    table), in the order they were written."""

    end_lsn: int
    committed: datetime.datetime
    payloads: list[Item]
    xid: int = 0


class Decoder:
    """pgoutput's messages (protocol version 1), one at a time, as `Transaction`s.

    Logical messages (`M`, transactional) with a prefix in `prefixes` give their payload;
    inserts (`I`) into table `messages` give the row as a `Message`, its content cut to
    `max_row_bytes` as `Store` reads it. Rows decoded from the WAL are the table's committed
    rows: nothing to verify. The tuple's values are pgoutput's text output, in the walsender
    session's settings: `created_at` must come as ISO in UTC (`STREAM_OPTIONS`); another form
    is parsed the slow way. A row whose columns do not read (a type changed, an unexpected
    value) is given as a `Reference`: the broker reads it from the table.

    Relations (`R`) describe a table before its first change in a decoding session: kept by
    oid for the decoder's life (the stream's, or one peek's)."""

    def __init__(
        self, prefixes: frozenset[str], max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    ) -> None:
        self._prefixes = prefixes
        self._max_row_bytes = max_row_bytes
        self._relations: dict[int, dict[str, int] | None] = {}  # oid -> column -> index
        self._items: list[Item] = []
        self._committed = PG_EPOCH
        self._xid = 0

    def feed(self, data: bytes) -> Transaction | None:
        """One pgoutput message; the transaction it ends, if it ends one with items."""
        kind = data[:1]
        if kind == b"I":  # relation oid, 'N', tuple
            (oid,) = struct.unpack_from(">I", data, 1)
            columns = self._relations.get(oid)
            if columns is not None and data[5:6] == b"N":
                row = _row(columns, _tuple(data, 6), self._max_row_bytes)
                if row is not None:
                    self._items.append(row)
        elif kind == b"M":  # flags, LSN, prefix\0, length, content
            nul = data.index(b"\0", 10)
            (length,) = struct.unpack_from(">I", data, nul + 1)
            if data[1] & 1 and data[10:nul].decode() in self._prefixes:
                self._items.append(data[nul + 5 : nul + 5 + length].decode())
        elif kind == b"B":  # final LSN, commit time, xid
            _, micros, self._xid = struct.unpack_from(">QqI", data, 1)
            self._committed = PG_EPOCH + datetime.timedelta(microseconds=micros)
            self._items = []
        elif kind == b"C":  # flags, commit LSN, end LSN, commit time
            _, _, end, _ = struct.unpack_from(">BQQq", data, 1)
            items, self._items = self._items, []
            if items:
                return Transaction(end, self._committed, items, self._xid)
        elif kind == b"R":
            self._relation(data)
        return None

    def _relation(self, data: bytes) -> None:
        """oid, namespace, name, replica identity, columns (flags, name, type, typmod)."""
        (oid,) = struct.unpack_from(">I", data, 1)
        end = data.index(b"\0", 5)
        name_end = data.index(b"\0", end + 1)
        name = data[end + 1 : name_end].decode()
        (count,) = struct.unpack_from(">H", data, name_end + 2)
        at = name_end + 4
        columns: dict[str, int] = {}
        for index in range(count):
            nul = data.index(b"\0", at + 1)
            columns[data[at + 1 : nul].decode()] = index
            at = nul + 9
        self._relations[oid] = columns if name == MESSAGES_TABLE else None


def _tuple(data: bytes, at: int) -> list[bytes | None]:
    """TupleData: each column's text, None for a null (and for an unchanged toasted value,
    which an insert never has)."""
    (count,) = struct.unpack_from(">H", data, at)
    at += 2
    values: list[bytes | None] = []
    for _ in range(count):
        kind = data[at : at + 1]
        at += 1
        if kind == b"t":
            (length,) = struct.unpack_from(">I", data, at)
            values.append(data[at + 4 : at + 4 + length])
            at += 4 + length
        else:  # 'n' null, 'u' unchanged toast
            values.append(None)
    return values


def _row(
    columns: dict[str, int], values: list[bytes | None], max_bytes: int
) -> Message | Reference | None:
    """A `messages` row's `Message` (as `Store` reads it), or its `Reference` if a column
    does not read as the table defines it; None, logged, for a row without an id (a table
    `messages` that is not pgsse's)."""
    raw_id = values[columns["id"]] if "id" in columns else None
    try:
        content = values[columns["content"]]
        robot_id = values[columns["robot_id"]]
        intent = values[columns["intent"]]
        session_id = values[columns["session_id"]]
        created_at = values[columns["created_at"]]
        if raw_id is None or content is None or session_id is None or created_at is None:
            raise ValueError("a NOT NULL column without a value")
        size = len(content)
        # Over the cap: as `Store` cuts it (its first `max_bytes` bytes, a split character
        # left out), without decoding the whole value first.
        text = (
            content.decode()
            if size <= max_bytes
            else cut_content(content[: max_bytes + 4].decode(errors="ignore"), max_bytes)
        )
        return Message(
            id=int(raw_id),
            session_id=session_id.decode(),
            robot_id=None if robot_id is None else robot_id.decode(),
            content=text,
            is_from_bot=values[columns["is_from_bot"]] == b"t",
            is_human=values[columns["is_human"]] == b"t",
            intent=None if intent is None else intent.decode(),
            created_at=iso_utc(created_at.decode()),
            content_bytes=size if size > max_bytes else None,
        )
    except (KeyError, ValueError, IndexError) as exc:
        if raw_id is None or not raw_id.isdigit():
            log.error("capture_row_unreadable", error=str(exc))
            return None
        log.warning("capture_row_unreadable", id=int(raw_id), error=str(exc))
        return Reference(int(raw_id))


def iso_utc(text: str) -> str:
    """PostgreSQL's ISO text of a timestamptz in UTC (`2026-12-07 18:03:00.123456+00`) as
    `events.utc_timestamp` writes the same instant (`2026-12-07T18:03:00.123Z`: milliseconds,
    truncated); any other offset through `datetime`. Raises `ValueError` for what is not an
    ISO timestamp (`infinity`, a year BC)."""
    fast = len(text) >= 22 and text[10] == " " and text[-3:] == "+00" and text[19] in ".+"
    if fast and text[0] != "0":  # a year before 1000: strftime writes it unpadded
        millis = (text[20:-3] + "000")[:3] if text[19] == "." else "000"
        return f"{text[:10]}T{text[11:19]}.{millis}Z"
    return utc_timestamp(datetime.datetime.fromisoformat(text))


def decode(
    rows: list[tuple[Any, ...]],
    prefixes: frozenset[str],
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> list[Transaction]:
    """pgoutput's rows (`data` of each) as transactions, in commit order (`Decoder`)."""
    decoder = Decoder(prefixes, max_row_bytes)
    done: list[Transaction] = []
    for row in rows:
        txn = decoder.feed(bytes(row[-1]))
        if txn is not None:
            done.append(txn)
    return done


def _oldest_commit(rows: list[tuple[Any, ...]]) -> datetime.datetime | None:
    """The commit time of the first transaction among pgoutput's `rows` that carries a row
    or a message (its rows are not decoded: a lag sample needs none, and the sampling
    session's DateStyle may not be ISO)."""
    committed: datetime.datetime | None = None
    for row in rows:
        data = bytes(row[-1])
        kind = data[:1]
        if kind == b"B":
            committed = PG_EPOCH + datetime.timedelta(
                microseconds=struct.unpack_from(">q", data, 9)[0]
            )
        elif kind in (b"I", b"M") and committed is not None:
            return committed
    return None


def _last_commit_end(rows: list[tuple[Any, ...]]) -> int:
    """The end LSN of the last commit among pgoutput's `rows` (0 when there is none)."""
    for row in reversed(rows):
        data = bytes(row[-1])
        if data[:1] == b"C":
            return int(struct.unpack_from(">Q", data, 10)[0])
    return 0


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# -- the reader ----------------------------------------------------------------------------


class SlotReader:
    """The payloads committed through the slot, in commit order, in batches: `await
    reader.next()`, hand the batch on, then `await reader.confirm()`; in a loop.

    `next()` before confirming the last batch returns it again (with whatever committed
    since): unconfirmed means not handed on. The connection (autocommit) is the reader's
    alone while it reads. Raises `SlotMissing`, `SlotBusy`, `SlotInvalidated`, and what the
    connection raises when it fails (`psycopg.OperationalError`)."""

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        slot: str,
        *,
        poll_seconds: float = POLL_SECONDS,
        prefixes: tuple[str, ...] = (PREFIX,),
        max_changes: int = MAX_CHANGES,
        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    ) -> None:
        self._conn = conn
        self._slot = slot
        self.poll_seconds = poll_seconds
        self._prefixes = frozenset(prefixes)
        self._max_changes = max_changes
        self._max_row_bytes = max_row_bytes
        self._settled = False  # the session's TimeZone and DateStyle set (`STREAM_OPTIONS`)
        self._query = (
            b"SELECT x.upto, c.data FROM (SELECT pg_current_wal_flush_lsn() AS upto) AS x"
            b" LEFT JOIN LATERAL pg_logical_slot_peek_binary_changes(%s, x.upto, %s,"
            b" 'proto_version', '1', 'publication_names', %s, 'messages', 'true') AS c ON true"
        )
        self._params = (slot, max_changes, PUBLICATION)
        self.position: int | None = None  # where `confirm` advances the slot to
        self.oldest_unconfirmed: datetime.datetime | None = None  # commit time, last batch
        self.polls = 0
        self._advanced_to = 0
        self._snapshots = True
        self._snapshot_upto = 0

    async def next(self) -> list[Item]:
        """The items of every transaction committed since the last confirm, at least one:
        polls every `poll_seconds` until there is one."""
        while True:  # polling is the design: no event says the slot has something
            if batch := await self.poll():
                return batch
            await asyncio.sleep(self.poll_seconds)

    async def poll(self) -> list[Item]:
        """One read of the slot: what `next()` returns, or [] when nothing committed."""
        rows = await self._peek()
        self.polls += 1
        upto = parse_lsn(rows[0][0])
        changes = [row for row in rows if row[1] is not None]
        done = decode(changes, self._prefixes, self._max_row_bytes)
        truncated = len(changes) >= self._max_changes
        await self._log_snapshot(upto)
        if done:
            # Every transaction committed before `upto` was decoded, unless the peek stopped
            # at `max_changes`: then only up to the last one read.
            self.position = done[-1].end_lsn if truncated else max(upto, done[-1].end_lsn)
            self.oldest_unconfirmed = done[0].committed
            return [payload for txn in done for payload in txn.payloads]
        # Nothing of interest: move the slot past it (others' writes, or a transaction of
        # other prefixes only), so no later poll decodes it again.
        past = upto if not truncated else _last_commit_end(changes)
        if self.position is None and past - self._advanced_to >= SNAPSHOT_BYTES:
            await self._advance(past)
        return []

    async def confirm(self, lsn: int | None = None) -> None:
        """The batch `next()` returned (or everything before `lsn`) was handed on: the slot
        moves past it, and no reader gets it again."""
        target = self.position if lsn is None else lsn
        if target is None:
            return
        await self._advance(target)
        self.position = None
        self.oldest_unconfirmed = None

    async def _log_snapshot(self, upto: int) -> None:
        """Log the running transactions each time the WAL grew `SNAPSHOT_BYTES`.

        Decoding starts at the slot's `restart_lsn`, not where it was confirmed, and that
        moves only past a running-transactions record, which PostgreSQL logs every 15 s: so
        every peek and advance re-decoded up to 15 s of WAL (29 MB and 73 ms a poll at 4,400
        rows/s here; 4,890 rows/s with one record a second, 6,480 with one each poll that
        found 64 kB more WAL). `pg_log_standby_snapshot()` (PostgreSQL 16; superuser, or
        granted) is one small WAL record; while the WAL stands still none is written.
        Without the privilege the reader works, with more CPU."""
        if not self._snapshots or upto - self._snapshot_upto < SNAPSHOT_BYTES:
            return
        self._snapshot_upto = upto
        try:
            await self._conn.execute("SELECT pg_log_standby_snapshot()")
        except (errors.InsufficientPrivilege, errors.UndefinedFunction) as exc:
            self._snapshots = False
            log.warning("capture_snapshot_unavailable", slot=self._slot, reason=str(exc))

    async def _peek(self) -> list[tuple[Any, ...]]:
        if not self._settled:  # pgoutput writes rows' values in the peeking session's settings
            await self._conn.execute(
                "SELECT set_config('TimeZone', 'UTC', false), set_config('DateStyle', 'ISO', false)"
            )
            self._settled = True
        try:
            cursor = await self._conn.execute(self._query, self._params)
        except psycopg.Error as exc:
            raise slot_error(exc, self._slot) from None
        return await cursor.fetchall()

    async def _advance(self, lsn: int) -> None:
        self._advanced_to = lsn
        try:
            await self._conn.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                (self._slot, format_lsn(lsn)),
            )
        except psycopg.Error as exc:
            raise slot_error(exc, self._slot) from None


def slot_error(exc: psycopg.Error, slot: str) -> Exception:
    """A slot's failure as one clear error; a connection failure as it is."""
    reason = " ".join(str(exc).split())
    if isinstance(exc, errors.UndefinedObject):
        return SlotMissing(
            f"no capture slot {slot!r} in this database: run `pgsse migrate` with"
            f" BROKER_CAPTURE=wal ({reason})"
        )
    if isinstance(exc, errors.ObjectInUse):
        return SlotBusy(f"capture slot {slot!r} is being read by another session ({reason})")
    if isinstance(exc, errors.ObjectNotInPrerequisiteState) and "invalidated" in reason:
        return SlotInvalidated(
            f"capture slot {slot!r} was invalidated by PostgreSQL (max_slot_wal_keep_size"
            " exceeded): rows committed since its position must be read from the tables;"
            " `pgsse migrate --drop-capture`, then `pgsse migrate` with BROKER_CAPTURE=wal"
            f" makes a new one ({reason})"
        )
    if isinstance(exc, errors.ObjectNotInPrerequisiteState) and "cannot advance" in reason:
        return SlotBusy(f"capture slot {slot!r} was advanced by another reader ({reason})")
    return exc


# -- lag ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotLag:
    """How far the slot is behind: WAL bytes not yet confirmed (what PostgreSQL keeps for
    it), seconds since the oldest unread message committed (0 when none is unread, None when
    the slot could not be peeked), PostgreSQL's `wal_status` (`lost`: invalidated), and the
    pid of the session reading it right now, if any."""

    bytes: int
    seconds: float | None
    wal_status: str | None
    active_pid: int | None

    @property
    def invalidated(self) -> bool:
        return self.wal_status == "lost"


async def slot_lag(conn: psycopg.AsyncConnection[Any], slot: str) -> SlotLag:
    """The slot's lag, for stats and `/metrics`. Bytes and status come from
    `pg_replication_slots` (cheap); seconds from a peek of the first unread transaction,
    which decodes from the slot's position (skipped while a reader holds the slot, or when it
    is invalidated). Raises `SlotMissing` when there is no such slot."""
    row = await (
        await conn.execute(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, wal_status, active_pid"
            " FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
            (slot,),
        )
    ).fetchone()
    if row is None:
        raise SlotMissing(f"no capture slot {slot!r} in this database")
    lag_bytes, wal_status, active_pid = int(row[0] or 0), row[1], row[2]
    seconds: float | None = None
    if wal_status != "lost" and active_pid is None:
        try:
            rows = await (
                await conn.execute(
                    "SELECT lsn, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, 1,"
                    " 'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
                    (slot, PUBLICATION),
                )
            ).fetchall()
        except (errors.ObjectInUse, errors.ObjectNotInPrerequisiteState):
            rows = None  # a reader took it meanwhile, or it was just invalidated
        if rows is not None:
            oldest = _oldest_commit(rows)
            now = datetime.datetime.now(datetime.UTC)
            seconds = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    return SlotLag(lag_bytes, seconds, wal_status, active_pid)
