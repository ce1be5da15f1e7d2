"""The queries on `messages`, through a small connection pool.

The pool is sized for replay and publish traffic, never per subscriber: the broker's
PostgreSQL connections are this pool (at most `POOL_SIZE`) plus the one listening connection.
psycopg errors are translated here into `DatabaseUnavailable`, so callers see broker errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .errors import Unavailable
from .events import Message

__all__ = ["COLUMNS", "DatabaseUnavailable", "Store"]

POOL_SIZE = 4
COLUMNS = sql.SQL("id, session_id, robot_id, content, is_from_bot, is_human, intent, created_at")
ROW_OVERHEAD_BYTES = 512  # an encoded row's bytes besides its content, about (the other fields)


class DatabaseUnavailable(Unavailable):
    """PostgreSQL could not be reached or failed the query."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"database unavailable: {type(cause).__name__}", retry_after=2)


class Store:
    """Reads and writes rows of `messages`."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, wait_seconds: float = 5.0) -> AsyncIterator[Store]:
        """A store whose pool connects lazily: the broker starts even if PostgreSQL is down."""
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=POOL_SIZE,
            timeout=wait_seconds,
            open=False,
            kwargs={"autocommit": True},
            name="pgsse-store",
            # A connection that died while idle (PostgreSQL restarted) is replaced on checkout.
            check=AsyncConnectionPool.check_connection,
        )
        await pool.open(wait=False)
        try:
            yield cls(pool)
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
        row = await self._one(query, (session_id, robot_id, content, is_from_bot, is_human, intent))
        assert row is not None  # INSERT ... RETURNING always returns the row
        return Message.from_row(row)

    async def get(self, message_id: int) -> Message | None:
        query = sql.SQL("SELECT {} FROM messages WHERE id = %s").format(COLUMNS)
        row = await self._one(query, (message_id,))
        return None if row is None else Message.from_row(row)

    async def after(
        self,
        after_id: int,
        limit: int,
        session_id: str | None = None,
        robot_id: str | None = None,
        max_bytes: int | None = None,
    ) -> list[Message]:
        """Rows with id > `after_id` matching the filter, in id order, at most `limit`; with
        `max_bytes`, only as many as fit in about that many bytes (always one at least)."""
        conditions = [sql.SQL("id > %s")]
        params: list[Any] = [after_id]
        if session_id is not None:
            conditions.append(sql.SQL("session_id = %s"))
            params.append(session_id)
        if robot_id is not None:
            conditions.append(sql.SQL("robot_id = %s"))
            params.append(robot_id)
        params.append(limit)
        query = sql.SQL("SELECT {} FROM messages WHERE {} ORDER BY id LIMIT %s").format(
            COLUMNS, sql.SQL(" AND ").join(conditions)
        )
        if max_bytes is not None:
            query = _within(query, sql.Identifier("id"))
            params.append(max_bytes)
        return [Message.from_row(row) for row in await self._all(query, tuple(params))]

    async def in_order(self, ids: list[int], max_bytes: int) -> list[Message]:
        """The rows of `ids` that exist, in the order of `ids`, as many as fit in about
        `max_bytes` (always one at least)."""
        candidates = sql.SQL(
            "SELECT {}, position FROM unnest(%s::bigint[]) WITH ORDINALITY AS wanted (id, position)"
            " JOIN messages USING (id)"
        ).format(COLUMNS)
        query = _within(candidates, sql.Identifier("position"))
        return [Message.from_row(row) for row in await self._all(query, (ids, max_bytes))]

    async def by_ids(self, ids: list[int]) -> dict[int, Message]:
        """The rows of `ids` that exist, by id."""
        query = sql.SQL("SELECT {} FROM messages WHERE id = ANY(%s)").format(COLUMNS)
        rows = await self._all(query, (ids,))
        return {message.id: message for message in map(Message.from_row, rows)}

    async def ids_after(self, after_id: int) -> list[int]:
        """Every id above `after_id`, in order (for the listener's backfill)."""
        query = sql.SQL("SELECT id FROM messages WHERE id > %s ORDER BY id")
        return [int(row[0]) for row in await self._all(query, (after_id,))]

    async def last_id(self) -> int:
        """The highest id committed so far, 0 for an empty table."""
        row = await self._one(sql.SQL("SELECT coalesce(max(id), 0) FROM messages"), ())
        assert row is not None
        return int(row[0])

    async def _all(self, query: sql.Composable, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                rows: list[tuple[Any, ...]] = await cursor.fetchall()
                return rows
        except (psycopg.Error, PoolTimeout) as exc:
            raise DatabaseUnavailable(exc) from exc

    async def _one(self, query: sql.Composable, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query, params)
                row: tuple[Any, ...] | None = await cursor.fetchone()
                return row
        except (psycopg.Error, PoolTimeout) as exc:
            raise DatabaseUnavailable(exc) from exc


def _within(candidates: sql.Composable, order: sql.Identifier) -> sql.Composed:
    """`candidates` (COLUMNS and `order`), in `order`, cut where their running size passes a
    last parameter of bytes; the first row always stays. Sizes come from PostgreSQL
    (`octet_length` reads a stored value's length without fetching it), so rows past the
    budget never reach the broker's memory."""
    return sql.SQL(
        "SELECT {columns} FROM (SELECT *,"
        " sum(octet_length(content) + {overhead}) OVER (ORDER BY {order}) AS running,"
        " row_number() OVER (ORDER BY {order}) AS n FROM ({candidates}) AS candidates) AS page"
        " WHERE n = 1 OR running <= %s ORDER BY {order}"
    ).format(
        columns=COLUMNS,
        order=order,
        overhead=sql.Literal(ROW_OVERHEAD_BYTES),
        candidates=candidates,
    )
