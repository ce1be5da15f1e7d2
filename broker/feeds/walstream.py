"""The WAL capture's slot read over the streaming replication protocol: pushed, not polled.

`SlotReader` (`wal.py`) polls over SQL: 14-22 ms p99 delivery and a query every poll while
idle. Here the server pushes: a `replication=database` connection runs `START_REPLICATION`
with the same `pgoutput` options and the copy-both stream carries the same pgoutput messages
as they are decoded, once (`make bench`: p99 0.59 ms at 500 rows/s against 24.9 ms polling;
docs/capture.md). psycopg 3 has no replication API, so this drives libpq through psycopg's
`pq` layer: the socket's reader is added to the loop once, and each time it is readable every
message it holds is taken.

Confirming is the same contract as `SlotReader`: the slot's position moves (the status
update's flush position) only to what `confirm()` was told, so a reader killed before
confirming loses nothing and the next one gets the batch again. Unlike `SlotReader`, a batch
not confirmed does not come again on the same stream. While nothing is outstanding, the
position follows the server's keepalives, so others' WAL never holds the slot back; up to
`idle_limit` when one is set (the relay: the slot is never past what the bus holds).

**The loop watches a descriptor of its own.** libpq closes its socket inside whichever call
reads the end of the connection (`consume_input`, and `flush` when a write fails), and the
number is free for the next socket at once. A reader left on that number watches someone
else's socket, and under uvloop the next change to it aborts the process: libuv's
`epoll_ctl` fails on a descriptor the kernel forgot, and libuv calls abort() (seen in CI:
the walsender terminated 50 times a second, the broker died with SIGABRT). So the stream
watches a `dup` of the socket that it closes only after the reader is gone: libpq's close
never reaches it. At the end of the connection the dup stays readable, so the first failed
read stops the watch (`_fail`).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import struct
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import psycopg
from psycopg import pq, sql

from ..slots import PREFIX, PUBLICATION
from ..store import DEFAULT_MAX_ROW_BYTES
from .wal import PG_EPOCH, STREAM_OPTIONS, Decoder, Item, Transaction, slot_error

__all__ = ["SlotStream"]

XLOG_DATA_HEADER = 25  # 'w', start LSN, end LSN, send time


class SlotStream:
    """The rows and payloads committed through the slot (`wal.Decoder`), in commit order, in
    batches, pushed by the server: `async with SlotStream(url, slot) as stream`, then `await
    stream.next()`, hand the batch on, `await stream.confirm()`; in a loop.

    Raises `SlotMissing`, `SlotBusy`, `SlotInvalidated` on start, and
    `psycopg.OperationalError` from `next()` when the connection fails."""

    def __init__(
        self,
        url: str,
        slot: str,
        *,
        prefixes: tuple[str, ...] = (PREFIX,),
        application_name: str = "pgsse-capture",
        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
        idle_limit: int | None = None,
    ) -> None:
        self._url = url
        self._slot = slot
        self._application_name = application_name
        self._decoder = Decoder(frozenset(prefixes), max_row_bytes)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._pgconn: pq.abc.PGconn | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1  # the loop's descriptor: a dup of the socket, closed after the reader
        self._done: deque[Transaction] = deque()  # received, not yet returned
        self._receiving = False  # between a transaction's Begin and its Commit
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._confirmed = 0  # what the server was told may go
        self._handed = 0  # the end of the last batch `next()` returned
        self.position: int | None = None  # where `confirm` moves the slot to
        self.xids: list[int] = []  # the transactions of the last batch `next()` returned
        self.oldest_unconfirmed: datetime.datetime | None = None
        # While not None, idle advances stop here (the relay raises it as Redis takes its
        # marks: the slot is never past what the bus says it holds); `idle_end` is where
        # they would have gone.
        self.idle_limit = idle_limit
        self.idle_end = 0

    async def __aenter__(self) -> SlotStream:
        self._conn = await psycopg.AsyncConnection.connect(
            self._url,
            autocommit=True,
            replication="database",
            application_name=self._application_name,
            options=STREAM_OPTIONS,  # rows' values as the decoder reads them
            connect_timeout=5,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        try:
            await self._start()
        except BaseException:
            try:
                await self._conn.close()
            finally:
                self._close_descriptor()
            raise
        return self

    async def _start(self) -> None:
        """START_REPLICATION, then the socket's reader for the stream."""
        assert self._conn is not None
        pgconn = self._pgconn = self._conn.pgconn
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0"
            " (proto_version '1', publication_names {}, messages 'true')"
        ).format(sql.Identifier(self._slot), sql.Literal(PUBLICATION))
        pgconn.send_query(command.as_bytes(self._conn))
        self._loop = asyncio.get_running_loop()
        self._fd = os.dup(pgconn.socket)
        started: asyncio.Future[None] = self._loop.create_future()
        self._watch(self._on_starting, started)
        try:
            self._on_starting(started)
            await started
        finally:
            self._unwatch()
        self._watch(self._on_readable)
        self._on_readable()  # what libpq read with the answer is in its buffer, not the socket

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pgconn is not None and self._error is None:
            try:  # the last status first, then the end of the copy
                self._send_status()
                self._pgconn.put_copy_end()
                self._pgconn.flush()
            except psycopg.Error:
                pass  # the connection is gone: the server keeps what it was told
        try:
            if self._conn is not None:
                await self._conn.close()
        finally:
            self._close_descriptor()

    def _watch(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.add_reader(self._fd, callback, *args)

    def _unwatch(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)

    def _close_descriptor(self) -> None:
        self._unwatch()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _fail(self, exc: psycopg.Error) -> None:
        """The connection failed: no more reading, and `next()` raises `exc`."""
        self._error = exc
        self._unwatch()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_starting(self, started: asyncio.Future[None]) -> None:
        """Wait for START_REPLICATION's answer: copy-both, or the error."""
        assert self._pgconn is not None and self._conn is not None
        if started.done():
            return
        try:
            self._pgconn.consume_input()
        except psycopg.Error as exc:  # the server went while starting
            started.set_exception(exc)
            return
        if self._pgconn.is_busy():
            return
        result = self._pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.COPY_BOTH:
            started.set_result(None)
            return
        message = (
            result.error_message.decode(errors="replace")
            if result is not None
            else self._pgconn.error_message.decode(errors="replace")
        )
        error = psycopg.errors.lookup(
            (result.error_field(pq.DiagnosticField.SQLSTATE) or b"XX000").decode()
            if result is not None
            else "XX000"
        )(message)
        started.set_exception(slot_error(error, self._slot))

    async def next(self) -> list[Item]:
        """The items of every transaction received and not yet returned, at least one."""
        while not self._done:
            if self._error is not None:
                raise self._error
            assert self._loop is not None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        batch = [item for txn in self._done for item in txn.payloads]
        self.xids = [txn.xid for txn in self._done]
        self.position = self._done[-1].end_lsn
        self.oldest_unconfirmed = self._done[0].committed
        self._handed = self.position
        self._done.clear()
        return batch

    def unconfirmed_since(self) -> datetime.datetime | None:
        """The commit time of the oldest transaction received and not yet confirmed (handed
        out by `next()` or still waiting for it), None when there is none: the slot's lag in
        time, as its reader sees it."""
        if self.oldest_unconfirmed is not None:
            return self.oldest_unconfirmed
        return self._done[0].committed if self._done else None

    async def confirm(self) -> None:
        """The batch `next()` returned was handed on: the slot moves past it."""
        if self.position is None:
            return
        self._confirmed = self.position
        self.position = None
        self.oldest_unconfirmed = None
        self._send_status()  # 34 bytes, no round trip: the slot moves at once

    def _on_readable(self) -> None:
        pgconn = self._pgconn
        assert pgconn is not None
        try:
            pgconn.consume_input()
            while True:
                size, data = pgconn.get_copy_data(1)
                if size == 0:
                    break
                if size < 0:
                    raise psycopg.OperationalError(
                        "the replication stream ended: "
                        + pgconn.error_message.decode(errors="replace").strip()
                    )
                self._on_message(bytes(data))
        except psycopg.Error as exc:
            self._fail(exc)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self._done:
            waiter.set_result(None)

    def _on_message(self, data: bytes) -> None:
        kind = data[:1]
        if kind == b"w":
            self._on_pgoutput(data[XLOG_DATA_HEADER:])
        elif kind == b"k":  # keepalive: WAL end, send time, reply requested
            wal_end, _, reply = struct.unpack_from(">QqB", data, 1)
            idle = not self._done and not self._receiving and self.position is None
            if idle and wal_end > self._confirmed and self._handed <= self._confirmed:
                self.idle_end = wal_end  # everything before it was sent: none of ours
                limit = self.idle_limit
                self._confirmed = max(
                    self._confirmed, min(wal_end, wal_end if limit is None else limit)
                )
            if reply:
                self._send_status()

    def _on_pgoutput(self, message: bytes) -> None:
        kind = message[:1]
        if kind == b"B":
            self._receiving = True
        elif kind == b"C":
            self._receiving = False
        txn = self._decoder.feed(message)
        if txn is not None:
            self._done.append(txn)

    def _send_status(self) -> None:
        """Tell the server what may go: written, flushed and applied up to `_confirmed`."""
        pgconn = self._pgconn
        assert pgconn is not None and self._loop is not None
        now = datetime.datetime.now(datetime.UTC) - PG_EPOCH
        micros = (now.days * 86_400 + now.seconds) * 1_000_000 + now.microseconds
        lsn = self._confirmed
        pgconn.put_copy_data(b"r" + struct.pack(">QQQqB", lsn, lsn, lsn, micros, 0))
        pgconn.flush()
