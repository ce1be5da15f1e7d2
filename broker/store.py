"""The queries on `messages`, through a small connection pool or on one given connection.

The pool is sized for replay and publish traffic, never per subscriber: the broker's
PostgreSQL connections are this pool (at most `POOL_SIZE`) plus the one listening connection,
which runs the same queries through `Store.using(conn)` (its backfill must not wait for the
pool). psycopg errors are translated here into `DatabaseUnavailable`, so callers see broker
errors.

Recovery: psycopg_pool retries a failed connection with its own backoff (1 s doubling, for up
to `reconnect_timeout`), so after a 3 s outage the pool came back up to 7 s after PostgreSQL
did and replays failed with `PoolTimeout` meanwhile. A failed attempt here gives up
after `RECONNECT_SECONDS` instead (the next request starts a new one at once), and the feed
that LISTENs (the listener, or the relay on a bus) calls `revive` once its backfill is done
(`feeds/source.py`), so the pool reconnects within the same second.

What one row may cost is bounded: a row whose content is over `max_row_bytes`
(`BROKER_MAX_ROW_BYTES`) is read cut, by PostgreSQL, to its first `max_row_bytes` characters
(`left` reads only that slice of a stored value, `octet_length` its size without fetching it),
then to as many bytes here; the `Message` carries the full size (`content_bytes`) and its event
says `"truncated": true`. Every read goes through here (live, backfill, relay, replay,
history), so a client sees one row the same way live and on resume; one huge row read whole
delays every other session's rows (measured in docs/security.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from functools import partial
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import AsyncRowFactory, kwargs_row, tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .errors import Unavailable
from .events import Message, cut_content, utc_timestamp
from .filters import EVERYTHING, Filter
from .signing import RowKey

__all__ = ["COLUMNS", "DEFAULT_MAX_ROW_BYTES", "DatabaseUnavailable", "Store"]

POOL_SIZE = 4
RECONNECT_SECONDS = 0.5
APPLICATION_NAME = "pgsse-store"
Query = sql.SQL | sql.Composed
COLUMNS = sql.SQL("id, session_id, robot_id, content, is_from_bot, is_human, intent, created_at")
DEFAULT_MAX_ROW_BYTES = 1024 * 1024  # as `BROKER_MAX_ROW_BYTES`
ROW_OVERHEAD_BYTES = 512  # an encoded row's bytes besides its content, about (the other fields)
Row = TypeVar("Row")

log = structlog.get_logger(logger_name=__name__)


class DatabaseUnavailable(Unavailable):
    """PostgreSQL could not be reached or failed the query."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"database unavailable: {type(cause).__name__}", retry_after=2)


def _message(**columns: Any) -> Message:
    """A `Message` from a row of `COLUMNS`, by column name (its fields are named for them)."""
    columns["created_at"] = utc_timestamp(columns["created_at"])
    return Message(**columns)


def _bounded_message(max_bytes: int, **columns: Any) -> Message:
    """A `Message` from a row of `_bounded_columns(max_bytes)`: a cut content is cut again
    to `max_bytes` bytes (PostgreSQL cut it to as many characters)."""
    if columns["content_bytes"] is not None:
        columns["content"] = cut_content(columns["content"], max_bytes)
    return _message(**columns)


def _bounded_columns(max_bytes: int) -> sql.Composed:
    """`COLUMNS`, with `content` cut to `max_bytes` characters when it is over `max_bytes`
    bytes, and `content_bytes`: its full size when cut, else NULL."""
    return sql.SQL(
        "id, session_id, robot_id,"
        " CASE WHEN octet_length(content) > {max} THEN left(content, {max}) ELSE content END"
        " AS content,"
        " is_from_bot, is_human, intent, created_at,"
        " CASE WHEN octet_length(content) > {max} THEN octet_length(content) END AS content_bytes"
    ).format(max=sql.Literal(max_bytes))


MESSAGE_ROW = kwargs_row(_message)
TUPLE_ROW: AsyncRowFactory[tuple[Any, ...]] = tuple_row


class Store:
    """Reads and writes rows of `messages`, through a pool or on one connection."""

    def __init__(
        self,
        source: AsyncConnectionPool[Any] | psycopg.AsyncConnection[Any],
        max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    ) -> None:
        self._source = source
        self._revival: asyncio.Task[None] | None = None
        self.max_row_bytes = max_row_bytes
        self._columns = _bounded_columns(max_row_bytes)
        self._rows = kwargs_row(partial(_bounded_message, max_row_bytes))

    def using(self, conn: psycopg.AsyncConnection[Any]) -> Store:
        """The same queries, run on `conn` (an autocommit connection the caller holds)."""
        return Store(conn, self.max_row_bytes)

    def revive(self) -> None:
        """PostgreSQL is back: have the pool test its connections and reconnect now, rather
        than when its own retry comes due. Returns at once; the check runs as a task."""
        pool = self._source
        if not isinstance(pool, AsyncConnectionPool) or self._revival is not None:
            return
        self._revival = asyncio.create_task(pool.check())
        self._revival.add_done_callback(self._revived)

    def _revived(self, task: asyncio.Task[None]) -> None:
        self._revival = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("store_revive_failed", error=repr(task.exception()))

    def _connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        if isinstance(self._source, AsyncConnectionPool):
            return self._source.connection()
        return nullcontext(self._source)

    @asynccontextmanager
    async def borrowed(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of the pool (or the store's one connection) for queries written
        elsewhere (the change log's reads): a failure in the block raises
        `DatabaseUnavailable`, as the store's own queries do."""
        try:
            async with self._connection() as conn:
                yield conn
        except (psycopg.Error, PoolTimeout) as exc:
            raise DatabaseUnavailable(exc) from exc

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, wait_seconds: float = 5.0, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    ) -> AsyncIterator[Store]:
        """A store whose pool connects lazily: the broker starts even if PostgreSQL is down."""
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=POOL_SIZE,
            timeout=wait_seconds,
            reconnect_timeout=RECONNECT_SECONDS,
            open=False,
            kwargs={"autocommit": True, "application_name": APPLICATION_NAME},
            name="pgsse-store",
            # A connection that died while idle (PostgreSQL restarted) is replaced on checkout.
            check=AsyncConnectionPool.check_connection,
        )
        await pool.open(wait=False)
        try:
            yield cls(pool, max_row_bytes)
        finally:
            await pool.close()

    async def insert(
        self,
        session_id: str,
        content: str,
        robot_id: str | None = None,
        is_from_bot: bool = False,
        is_human: bool = True,
        intent: str | None = None,
    ) -> Message:
        query = sql.SQL(
            "INSERT INTO messages (session_id, robot_id, content, is_from_bot, is_human, intent)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING {}"
        ).format(COLUMNS)
        params = (session_id, robot_id, content, is_from_bot, is_human, intent)
        message = await self._one(query, params, MESSAGE_ROW)
        assert message is not None  # INSERT ... RETURNING always returns the row
        return message

    async def get(self, message_id: int) -> Message | None:
        query = sql.SQL("SELECT {} FROM messages WHERE id = %s").format(self._columns)
        return await self._one(query, (message_id,), self._rows)

    async def after(
        self,
        after_id: int,
        limit: int,
        wanted: Filter = EVERYTHING,
        max_bytes: int | None = None,
    ) -> list[Message]:
        """Rows with id > `after_id` matching `wanted`, in id order, at most `limit`; with
        `max_bytes`, only as many as fit in about that many bytes (always one at least)."""
        where, params = _where(wanted, after_id)
        query: Query = sql.SQL("SELECT {} FROM messages {} ORDER BY id LIMIT %s").format(
            COLUMNS if max_bytes is not None else self._columns, where
        )
        params.append(limit)
        if max_bytes is not None:
            query = self._within(query, sql.Identifier("id"))
            params.append(max_bytes)
        return await self._all(query, tuple(params), self._rows)

    async def in_order(
        self,
        ids: list[int],
        max_bytes: int,
        wanted: Filter = EVERYTHING,
    ) -> list[Message]:
        """The rows of `ids` that exist and match `wanted` as stored now, in the order of
        `ids`, as many as fit in about `max_bytes` (always one at least).

        The filter is checked here, against the table, not taken from whoever chose `ids`
        (the journal): a row moved to another session since (`UPDATE ... SET session_id`), or
        an id that names another row now, is never read on a stream's behalf."""
        where, params = _where(wanted)
        candidates = sql.SQL(
            "SELECT {}, position FROM unnest(%s::bigint[]) WITH ORDINALITY AS wanted (id, position)"
            " JOIN messages USING (id) {}"
        ).format(COLUMNS, where)
        query = self._within(candidates, sql.Identifier("position"))
        return await self._all(query, (ids, *params, max_bytes), self._rows)

    async def row_key(self) -> RowKey:
        """The database's signing key (`signing.py`); `DatabaseUnavailable` if it cannot be
        read (no `pgsse migrate` yet, or a role without the right to read `pgsse_key`)."""
        row = await self._one(sql.SQL("SELECT key FROM pgsse_key"), (), TUPLE_ROW)
        if row is None:
            raise DatabaseUnavailable(LookupError("pgsse_key is empty: run pgsse migrate"))
        return RowKey(bytes(row[0]))

    async def by_ids(self, ids: list[int]) -> dict[int, Message]:
        """The rows of `ids` that exist, by id."""
        query = sql.SQL("SELECT {} FROM messages WHERE id = ANY(%s)").format(self._columns)
        return {message.id: message for message in await self._all(query, (ids,), self._rows)}

    async def oldest_of_last(self, count: int, wanted: Filter = EVERYTHING) -> int | None:
        """The id of the oldest of the last `count` rows matching `wanted` (`history=N`
        starts there), None when none match."""
        where, params = _where(wanted)
        query = sql.SQL(
            "SELECT min(id) FROM (SELECT id FROM messages {} ORDER BY id DESC LIMIT %s) AS last"
        ).format(where)
        row = await self._one(query, (*params, count), TUPLE_ROW)
        return None if row is None or row[0] is None else int(row[0])

    async def ids_after(self, after_id: int) -> list[int]:
        """Every id above `after_id`, in order (for the listener's backfill)."""
        query = sql.SQL("SELECT id FROM messages WHERE id > %s ORDER BY id")
        return [int(row[0]) for row in await self._all(query, (after_id,), TUPLE_ROW)]

    async def last_id(self) -> int:
        """The highest id committed so far, 0 for an empty table."""
        row = await self._one(sql.SQL("SELECT coalesce(max(id), 0) FROM messages"), (), TUPLE_ROW)
        assert row is not None
        return int(row[0])

    def _within(self, candidates: sql.Composable, order: sql.Identifier) -> sql.Composed:
        """`candidates` (COLUMNS and `order`), in `order`, cut where their running size passes
        a last parameter of bytes; the first row always stays. Sizes come from PostgreSQL
        (`octet_length` reads a stored value's length without fetching it), so rows past the
        budget never reach the broker's memory; a row counts as at most `max_row_bytes`, what
        is read of it."""
        return sql.SQL(
            "SELECT {columns} FROM (SELECT *,"
            " sum(least(octet_length(content), {max}) + {overhead}) OVER (ORDER BY {order})"
            " AS running,"
            " row_number() OVER (ORDER BY {order}) AS n FROM ({candidates}) AS candidates) AS page"
            " WHERE n = 1 OR running <= %s ORDER BY {order}"
        ).format(
            columns=self._columns,
            order=order,
            max=sql.Literal(self.max_row_bytes),
            overhead=sql.Literal(ROW_OVERHEAD_BYTES),
            candidates=candidates,
        )

    async def _all(
        self, query: Query, params: tuple[Any, ...], rows: AsyncRowFactory[Row]
    ) -> list[Row]:
        try:
            async with self._connection() as conn:
                cursor = conn.cursor(row_factory=rows)
                await cursor.execute(query, params)
                return await cursor.fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise DatabaseUnavailable(exc) from exc

    async def _one(
        self, query: Query, params: tuple[Any, ...], rows: AsyncRowFactory[Row]
    ) -> Row | None:
        try:
            async with self._connection() as conn:
                cursor = conn.cursor(row_factory=rows)
                await cursor.execute(query, params)
                return await cursor.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            raise DatabaseUnavailable(exc) from exc


def _where(wanted: Filter, after_id: int | None = None) -> tuple[sql.Composable, list[Any]]:
    """The WHERE clause of a stream's filter (empty for none), and its parameters: the rule
    of `Filter.matches`. One session is `=` (its index scan, as before); several, `= ANY`."""
    conditions: list[sql.Composable] = []
    params: list[Any] = []
    sessions = wanted.sessions
    for condition, value in (
        ("id > %s", after_id),
        ("session_id = %s", sessions[0] if sessions is not None and len(sessions) == 1 else None),
        ("session_id = ANY(%s)", list(sessions) if sessions and len(sessions) > 1 else None),
        ("robot_id = %s", wanted.robot_id),
    ):
        if value is not None:
            conditions.append(sql.SQL(condition))
            params.append(value)
    if not conditions:
        return sql.SQL(""), params
    return sql.SQL("WHERE ") + sql.SQL(" AND ").join(conditions), params
