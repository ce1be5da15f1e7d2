"""Capture through the WAL (`BROKER_CAPTURE=wal`): a trigger that never takes NOTIFY's lock.

PostgreSQL serialises every committing transaction that called NOTIFY on one cluster-wide lock
held through its commit's WAL flush, so notifying writers cannot share a group commit (issue
23 measured 0.24-0.27 of the no-trigger INSERT rate at 16-32 writers). In this mode the trigger
writes the same signed payload with `pg_logical_emit_message(true, 'pgsse_messages', ...)`: a
WAL record of the writer's own transaction, no lock, and it exists only if that transaction
commits. A `SlotReader` reads the payloads back from a logical replication slot with the
built-in `pgoutput` plugin (`messages 'true'`; its publication holds no table, so nothing but
the messages and their transactions' Begin/Commit arrive), in commit order.

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

from ..slots import PREFIX, PUBLICATION, SlotBusy, SlotInvalidated, SlotMissing

__all__ = [
    "SlotLag",
    "SlotReader",
    "Transaction",
    "decode",
    "format_lsn",
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

log = structlog.get_logger(logger_name=__name__)


# -- pgoutput -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transaction:
    """One committed transaction's payloads with `prefix`, and where it ends in the WAL."""

    end_lsn: int
    committed: datetime.datetime
    payloads: list[str]


def decode(rows: list[tuple[Any, ...]], prefixes: frozenset[str]) -> list[Transaction]:
    """pgoutput's rows (`data` of each) as transactions, in commit order; payloads of
    transactional messages with a prefix in `prefixes` only. Other messages are skipped:
    relations and row changes (there are none with an empty publication) and messages
    outside a transaction (the triggers write none)."""
    done: list[Transaction] = []
    payloads: list[str] = []
    committed = PG_EPOCH
    for row in rows:
        data = bytes(row[-1])
        kind = data[:1]
        if kind == b"B":  # final LSN, commit time, xid
            _, micros, _ = struct.unpack_from(">QqI", data, 1)
            committed = PG_EPOCH + datetime.timedelta(microseconds=micros)
            payloads = []
        elif kind == b"M":  # flags, LSN, prefix\0, length, content
            flags = data[1]
            nul = data.index(b"\0", 10)
            prefix = data[10:nul].decode()
            (length,) = struct.unpack_from(">I", data, nul + 1)
            if flags & 1 and prefix in prefixes:
                payloads.append(data[nul + 5 : nul + 5 + length].decode())
        elif kind == b"C":  # flags, commit LSN, end LSN, commit time
            _, _, end, _ = struct.unpack_from(">BQQq", data, 1)
            if payloads:
                done.append(Transaction(end, committed, payloads))
            payloads = []
    return done


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
    ) -> None:
        self._conn = conn
        self._slot = slot
        self.poll_seconds = poll_seconds
        self._prefixes = frozenset(prefixes)
        self._max_changes = max_changes
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

    async def next(self) -> list[str]:
        """The payloads of every transaction committed since the last confirm, at least one:
        polls every `poll_seconds` until there is one."""
        while True:  # polling is the design: no event says the slot has something
            if batch := await self.poll():
                return batch
            await asyncio.sleep(self.poll_seconds)

    async def poll(self) -> list[str]:
        """One read of the slot: what `next()` returns, or [] when nothing committed."""
        rows = await self._peek()
        self.polls += 1
        upto = parse_lsn(rows[0][0])
        changes = [row for row in rows if row[1] is not None]
        done = decode(changes, self._prefixes)
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
            oldest = next((txn.committed for txn in decode(rows, frozenset((PREFIX,)))), None)
            now = datetime.datetime.now(datetime.UTC)
            seconds = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    return SlotLag(lag_bytes, seconds, wal_status, active_pid)
