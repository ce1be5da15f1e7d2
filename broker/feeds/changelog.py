"""Reads of the change log (`pgsse.changes`, written by `capture.py`'s trigger), and pruning.

- `read(conn, feed, after, match)`: one bounded page of a feed's changes with position >
  `after` (and <= `upto`) that `match` selects, in position order. A page scans at most
  `scan` changes of the feed, so a rare filter never makes one query walk the whole log;
  `Page.through` is where the next page starts, `Page.done` says there is no more.
- `pruned_through(conn, feed)` (and `Page.expired(after)`, in the page's own snapshot): changes
  up to this position may have been pruned, so a resume from below it gets
  `{"type":"reset","reason":"history expired"}`. Exact in the safe direction: every pruned
  change has a position <= it (a retained one may too, since positions are taken in insert
  order and pruning goes by time).
- `fetch(conn, feed, position)`: one change, for a notification that is a reference;
  `at_positions(conn, feed, positions)`: the changes at given positions (a resume from the
  journal, which holds positions and route values, not the changes).
- `oldest_of_last(conn, feed, key, count, match)`: where `history=N` starts;
  `last_positions(conn, feeds)`: each feed's highest position (a listener's floor).
- `prune(conn, retention)`: deletes changes older than `retention` seconds in batches of
  `PRUNE_BATCH`, each its own short transaction under a transaction advisory lock that only
  pruners take (one instance prunes at a time; the others skip). Writers only INSERT into the
  log, so neither the lock nor the deleted rows' locks can make a writer wait.

Matching (`Match`): `keys` is a list of key values (None: any), `filters` equalities on filter
columns; values compare as text, as query parameters arrive (`data ->> column`). An insert
matches on its new row, a delete on its old row (`data` holds the old row's key, filters and
primary key), an update on its new row OR its old one (`data` overlaid with `old`, which holds
the old values of the route columns that changed): so a subscriber sees a row leave its filter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import structlog
from psycopg import sql
from psycopg.rows import tuple_row

from ..changes import OPS, Change

log = structlog.get_logger(logger_name="broker.feeds.changelog")

__all__ = [
    "OPS",
    "PRUNE_BATCH",
    "PRUNE_LOCK",
    "Change",
    "Match",
    "Page",
    "at_positions",
    "fetch",
    "last_positions",
    "oldest_of_last",
    "prune",
    "prune_batch",
    "pruned_through",
    "read",
]

PRUNE_LOCK = 0x70677370  # "pgsp": the transaction advisory lock pruners take
PRUNE_BATCH = 1_000  # changes deleted per transaction: short, so nothing waits long on it
PAGE = 500
SCAN = 5_000


@dataclass(frozen=True, slots=True)
class Match:
    """Which changes a subscriber wants: key values (None: any key) and filter equalities."""

    keys: Sequence[str] | None = None
    filters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Page:
    """Changes that matched, in position order; the log was read through position `through`
    (the next page's `after`); `done`: nothing more up to `upto`; `pruned_through`: the
    feed's watermark (`pruned_through()`) as of this page."""

    changes: list[Change]
    through: int
    done: bool
    pruned_through: int  # read in the page's own snapshot: see `expired`

    def expired(self, after: int) -> bool:
        """Whether a resume from `after` may have lost pruned changes (so: `reset`). Exact
        with the page: the watermark and the changes were read in one statement's snapshot,
        and a prune deletes and raises the watermark in one transaction."""
        return after < self.pruned_through


def _condition(doc: str, key: str, match: Match) -> tuple[sql.Composable, list[Any]]:
    """`match` on the JSON document `doc` (a fixed SQL expression), and its parameters."""
    parts: list[sql.Composable] = []
    params: list[Any] = []
    if match.keys is not None:
        parts.append(sql.SQL(f"({doc} ->> %s) = ANY(%s)"))
        params += [key, list(match.keys)]
    for column, value in match.filters.items():
        parts.append(sql.SQL(f"({doc} ->> %s) = %s"))
        params += [column, value]
    return (sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")), params


def _matching(key: str, match: Match) -> tuple[sql.Composable, list[Any]]:
    """Whether a change of the log matches: its row, or an update's old row."""
    new, new_params = _condition("data", key, match)
    old, old_params = _condition("(data || old)", key, match)
    condition = sql.SQL("{new} OR (op = 'u' AND old IS NOT NULL AND {old})").format(
        new=new, old=old
    )
    return condition, [*new_params, *old_params]


async def read(
    conn: psycopg.AsyncConnection[Any],
    feed: str,
    key: str,
    after: int,
    match: Match,
    *,
    upto: int | None = None,
    limit: int = PAGE,
    scan: int = SCAN,
) -> Page:
    """One page of `feed`'s changes with `after` < position <= `upto` that `match` selects
    (`key`: the feed's key column). At most `limit` changes, `scan` changes of the log read."""
    matched, match_params = _matching(key, match)
    query = sql.SQL(
        "SELECT w.pruned, c.* FROM (SELECT coalesce((SELECT pruned_through"
        " FROM pgsse.retention WHERE feed = %s), 0) AS pruned) AS w"
        " LEFT JOIN LATERAL (SELECT position, op::text,"
        " {matched}, data::text, old::text, at"
        " FROM pgsse.changes WHERE feed = %s AND position > %s AND position <= %s"
        " ORDER BY position LIMIT %s) AS c ON true ORDER BY c.position"
    ).format(matched=matched)
    bound = upto if upto is not None else 2**63 - 1
    params = [feed, *match_params, feed, after, bound, scan]
    cursor = conn.cursor(row_factory=tuple_row)
    rows = await (await cursor.execute(query, params)).fetchall()
    pruned = int(rows[0][0])  # one row at least: the LEFT JOIN keeps `w`
    rows = [row[1:] for row in rows if row[1] is not None]
    changes: list[Change] = []
    through = after
    for position, op, matched, data, old_data, at in rows:
        if matched:
            if len(changes) == limit:
                return Page(changes, through, False, pruned)
            old_doc = None if old_data is None else _json(old_data)
            changes.append(Change(feed, position, OPS[op], _json(data), old_doc, at))
        through = position
    return Page(changes, through, len(rows) < scan, pruned)


async def fetch(conn: psycopg.AsyncConnection[Any], feed: str, position: int) -> Change | None:
    """The change at `position` of `feed` (a notification too large to carry it is a
    reference `{"feed", "position", "ref": true}`); None if it was pruned."""
    cursor = conn.cursor(row_factory=tuple_row)
    await cursor.execute(
        "SELECT op::text, data::text, old::text, at FROM pgsse.changes"
        " WHERE feed = %s AND position = %s",
        (feed, position),
    )
    row = await cursor.fetchone()
    if row is None:
        return None
    op, data, old, at = row
    return Change(feed, position, OPS[op], _json(data), None if old is None else _json(old), at)


async def at_positions(
    conn: psycopg.AsyncConnection[Any], feed: str, positions: Sequence[int]
) -> dict[int, Change]:
    """The changes of `feed` at `positions` that the log holds (pruned ones are absent)."""
    cursor = conn.cursor(row_factory=tuple_row)
    await cursor.execute(
        "SELECT position, op::text, data::text, old::text, at FROM pgsse.changes"
        " WHERE feed = %s AND position = ANY(%s)",
        (feed, list(positions)),
    )
    return {
        position: Change(
            feed, position, OPS[op], _json(data), None if old is None else _json(old), at
        )
        for position, op, data, old, at in await cursor.fetchall()
    }


async def oldest_of_last(
    conn: psycopg.AsyncConnection[Any], feed: str, key: str, count: int, match: Match
) -> int | None:
    """The position of the oldest of the last `count` changes of `feed` that `match` selects
    (`history=N` starts there); None when none does."""
    matched, match_params = _matching(key, match)
    query = sql.SQL(
        "SELECT min(position) FROM (SELECT position FROM pgsse.changes WHERE feed = %s"
        " AND ({matched}) ORDER BY position DESC LIMIT %s) AS last"
    ).format(matched=matched)
    cursor = conn.cursor(row_factory=tuple_row)
    await cursor.execute(query, [feed, *match_params, count])
    row = await cursor.fetchone()
    return None if row is None or row[0] is None else int(row[0])


async def last_positions(
    conn: psycopg.AsyncConnection[Any], feeds: Sequence[str]
) -> dict[str, int]:
    """Each of `feeds`' highest position in the log (0: none), one index probe each."""
    cursor = conn.cursor(row_factory=tuple_row)
    await cursor.execute(
        "SELECT f, coalesce((SELECT max(position) FROM pgsse.changes WHERE feed = f), 0)"
        " FROM unnest(%s::text[]) AS f",
        (list(feeds),),
    )
    return {str(feed): int(position) for feed, position in await cursor.fetchall()}


def _json(text: str) -> dict[str, Any]:
    value = orjson.loads(text)
    assert isinstance(value, dict)  # the trigger writes objects only
    return value


async def pruned_through(conn: psycopg.AsyncConnection[Any], feed: str) -> int:
    """Positions of `feed` up to this one may be pruned (0: none were)."""
    cursor = await conn.execute(
        "SELECT pruned_through FROM pgsse.retention WHERE feed = %s", (feed,)
    )
    row = await cursor.fetchone()
    return 0 if row is None else int(row[0])


PRUNE = """\
WITH doomed AS (
    SELECT feed, position FROM pgsse.changes
    WHERE at < clock_timestamp() - make_interval(secs => %s)
    LIMIT %s FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM pgsse.changes c USING doomed d
    WHERE c.feed = d.feed AND c.position = d.position
    RETURNING c.feed, c.position
), marks AS (
    INSERT INTO pgsse.retention AS r (feed, pruned_through)
    SELECT feed, max(position) FROM gone GROUP BY feed
    ON CONFLICT (feed) DO UPDATE
        SET pruned_through = greatest(r.pruned_through, excluded.pruned_through)
)
SELECT count(*) FROM gone"""


async def prune_batch(
    conn: psycopg.AsyncConnection[Any], retention: float, batch: int = PRUNE_BATCH
) -> int | None:
    """In the caller's transaction: delete up to `batch` changes older than `retention`
    seconds; how many, or None if another pruner holds the lock."""
    cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,))
    locked = await cursor.fetchone()
    if not locked or not locked[0]:
        return None
    cursor = await conn.execute(PRUNE.encode(), (retention, batch))
    row = await cursor.fetchone()
    return 0 if row is None else int(row[0])


async def prune(
    conn: psycopg.AsyncConnection[Any],
    retention: float,
    *,
    batch: int = PRUNE_BATCH,
    max_batches: int = 1_000,
) -> int:
    """Delete every change older than `retention` seconds, one short transaction per batch
    (`conn`: autocommit); the number deleted. Stops when another pruner holds the lock, when a
    batch is not full, or after `max_batches` (the next call goes on)."""
    deleted = 0
    for _ in range(max_batches):
        async with conn.transaction():
            count = await prune_batch(conn, retention, batch)
        if count is None:
            break
        deleted += count
        if count < batch:
            break
    if deleted:
        log.info("changes_pruned", deleted=deleted, retention_seconds=retention)
    return deleted
