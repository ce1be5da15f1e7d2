"""Declared feeds: the TOML file of `BROKER_CONFIG` read into frozen `Feed` records.

Two steps, so that a mistake in the file is found before any connection is made:

- `read(path)` parses the file (`tomllib`) and checks what needs no database: feed names, known
  fields, events, types. No file: the guide's `messages` feed, inserts only, as before feeds.
- `resolve(conn, declared)` checks each feed against the catalog (the table exists, has a
  primary key, its columns exist) and returns the `Feed` records `capture.py` and the broker use.

Every mistake raises `ConfigError` with one line naming the feed and the field, e.g.
`feeds.orders.filters: column "statu" not in shop.orders (did you mean "status"?)`.

Decisions where the contract is silent:

- `table` is `name` or `schema.name`, each part the name exactly as the catalog spells it (no
  SQL quoting); an unqualified name is found through the search path, as SQL would.
- `data` always holds the primary key, the key and the filter columns, added after the
  declared `columns` when missing: routing reads the key and filters from each change, and a
  client merges rows by primary key.
- The messages feed (named `messages`) keeps its message shape: its table is `messages`, its key
  `session_id`, its filter `robot_id`, `columns` may not be set, and its inserts are always
  streamed (they replay from the table itself), so `events` must include `insert`.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ..errors import ConfigError

__all__ = ["EVENTS", "MESSAGES", "Declared", "Feed", "load", "read", "resolve"]

EVENTS = ("insert", "update", "delete")
MESSAGES = "messages"  # the guide's feed: its events keep the `message` shape
RESERVED = frozenset({"stats"})  # /api/sse/stats is the stats route
NAME = re.compile(r"[a-z0-9_-]{1,49}")  # 49: `pgsse_capture_<name>` fits PostgreSQL's 63 bytes
FIELDS = ("table", "key", "filters", "columns", "events")


@dataclass(frozen=True, slots=True)
class Declared:
    """One feed as the file declares it, checked for everything but the catalog."""

    name: str
    table: str
    key: str
    filters: tuple[str, ...]
    columns: tuple[str, ...] | None  # None: every column
    events: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Feed:
    """One feed, checked against the catalog.

    `columns` are those `data` holds, in order (the declared ones, then the primary key, key
    and filters when missing); `primary_key` is read from the catalog; `timestamptz` and
    `timestamp` name the columns among `columns` of those types (their values are written as
    UTC with milliseconds)."""

    name: str
    schema: str
    table: str
    key: str
    filters: tuple[str, ...]
    columns: tuple[str, ...]
    events: tuple[str, ...]
    primary_key: tuple[str, ...]
    all_columns: tuple[str, ...]  # every column of the table, in table order
    timestamptz: tuple[str, ...] = ()
    timestamp: tuple[str, ...] = ()
    sequence: str | None = None  # the positions' sequence, if not pgsse.position_seq

    @property
    def qualified(self) -> str:
        """`schema.table`, as messages name it (not quoted: for people, never for SQL)."""
        return f"{self.schema}.{self.table}"

    @property
    def route(self) -> tuple[str, ...]:
        """The key, the filters and the primary key: what a delete carries of the old row, and
        what `old` of an update may hold."""
        return _unique((self.key, *self.filters, *self.primary_key))

    @property
    def is_messages(self) -> bool:
        return self.name == MESSAGES


DEFAULT = (
    Declared(
        name=MESSAGES,
        table="messages",
        key="session_id",
        filters=("robot_id",),
        columns=None,
        events=("insert",),
    ),
)


def load(conn: psycopg.Connection[Any], path: Path | None) -> tuple[Feed, ...]:
    """The feeds of `path` (None: the default), checked against `conn`'s catalog."""
    return resolve(conn, read(path))


def read(path: Path | None) -> tuple[Declared, ...]:
    """The feeds the file at `path` declares; None: the guide's messages feed, inserts only."""
    if path is None:
        return DEFAULT
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"invalid BROKER_CONFIG={str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid BROKER_CONFIG={str(path)!r}: not TOML: {exc}") from None
    return parse(document)


def parse(document: Mapping[str, Any]) -> tuple[Declared, ...]:
    """The feeds of a parsed TOML document."""
    for name in document:
        if name != "feeds":
            raise ConfigError(f"{name}: unknown section{_hint(name, ['feeds'])}")
    feeds = document.get("feeds", {})
    if not isinstance(feeds, Mapping) or not feeds:
        raise ConfigError("feeds: must declare at least one feed, as [feeds.NAME]")
    return tuple(_declared(name, spec) for name, spec in feeds.items())


def _declared(name: str, spec: Any) -> Declared:
    where = f"feeds.{name}"
    if not NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: the feed name must be 1 to 49 of a-z, 0-9, _ and - (it is a URL segment)"
        )
    if name in RESERVED:
        raise ConfigError(f"{where}: the feed name {name!r} is reserved (/api/sse/{name})")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: must be a table of fields ({', '.join(FIELDS)})")
    for field in spec:
        if field not in FIELDS:
            raise ConfigError(f"{where}.{field}: unknown field{_hint(field, FIELDS)}")
    messages = name == MESSAGES
    table = spec.get("table", "messages" if messages else None)
    key = spec.get("key", "session_id" if messages else None)
    for field, value in (("table", table), ("key", key)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}.{field}: required, a string")
    assert isinstance(table, str) and isinstance(key, str)
    if table.count(".") > 1 or any(not part for part in table.split(".")):
        raise ConfigError(f"{where}.table: must be NAME or SCHEMA.NAME, got {table!r}")
    filters = _names(where, "filters", spec.get("filters", ["robot_id"] if messages else []))
    columns = _names(where, "columns", spec["columns"]) if "columns" in spec else None
    events = _names(where, "events", spec.get("events", ["insert"]))
    for event in events:
        if event not in EVENTS:
            raise ConfigError(
                f'{where}.events: unknown event "{event}"{_hint(event, EVENTS)};'
                f" one of {', '.join(EVENTS)}"
            )
    if not events:
        raise ConfigError(f"{where}.events: must name at least one of {', '.join(EVENTS)}")
    if messages:
        _messages_rules(where, table, key, filters, columns, events)
    if key in filters:
        raise ConfigError(f'{where}.filters: "{key}" is the key; a filter is another column')
    return Declared(name, table, key, filters, columns, events)


def _messages_rules(
    where: str,
    table: str,
    key: str,
    filters: tuple[str, ...],
    columns: tuple[str, ...] | None,
    events: tuple[str, ...],
) -> None:
    """The messages feed keeps the guide's shape: see the module docstring."""
    if table not in ("messages", "public.messages"):
        raise ConfigError(f'{where}.table: must be "messages" (the guide\'s table)')
    if key != "session_id":
        raise ConfigError(f'{where}.key: must be "session_id" (sessionId routes messages)')
    if filters != ("robot_id",):
        raise ConfigError(f'{where}.filters: must be ["robot_id"] (robotId filters messages)')
    if columns is not None:
        raise ConfigError(f"{where}.columns: not allowed: messages events have the message shape")
    if "insert" not in events:
        raise ConfigError(f'{where}.events: must include "insert" (messages always streams them)')


def _names(where: str, field: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}.{field}: must be a list of strings")
    if len(set(value)) != len(value):
        repeated = next(v for v in value if value.count(v) > 1)
        raise ConfigError(f'{where}.{field}: "{repeated}" is listed twice')
    return tuple(value)


def resolve(conn: psycopg.Connection[Any], declared: Sequence[Declared]) -> tuple[Feed, ...]:
    """`declared`, checked against the catalog of `conn`: raises `ConfigError` naming the
    first mistake's feed and field."""
    return tuple(_resolve(conn, feed) for feed in declared)


def _resolve(conn: psycopg.Connection[Any], declared: Declared) -> Feed:
    where = f"feeds.{declared.name}"
    schema, table, oid = _table(conn, where, declared.table)
    types = dict(
        conn.execute(
            "SELECT attname, atttypid::regtype::text FROM pg_attribute"
            " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (oid,),
        ).fetchall()
    )
    shown = f"{schema}.{table}" if "." in declared.table else table

    def column(field: str, name: str) -> str:
        if name not in types:
            raise ConfigError(
                f'{where}.{field}: column "{name}" not in {shown}{_hint(name, list(types))}'
            )
        return name

    primary = tuple(
        str(row[0])
        for row in conn.execute(
            "SELECT a.attname FROM pg_index i"
            " JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) ON true"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.n",
            (oid,),
        ).fetchall()
    )
    if not primary:
        raise ConfigError(
            f"{where}.table: {shown} has no primary key (changes are told apart by it)"
        )
    key = column("key", declared.key)
    filters = tuple(column("filters", name) for name in declared.filters)
    if declared.columns is None:
        listed = tuple(types)
    else:
        listed = tuple(column("columns", name) for name in declared.columns)
    columns = _unique((*listed, *primary, key, *filters))
    sequence = None
    if declared.name == MESSAGES:  # positions shared with its rows: the id sequence
        found = conn.execute(
            "SELECT pg_get_serial_sequence(%s, 'id')",
            (sql.Identifier(schema, table).as_string(conn),),
        ).fetchone()
        sequence = None if found is None else found[0]
        if sequence is None:
            raise ConfigError(f"{where}.table: {shown}.id draws from no sequence")
    return Feed(
        name=declared.name,
        schema=schema,
        table=table,
        key=key,
        filters=filters,
        columns=columns,
        events=declared.events,
        primary_key=primary,
        all_columns=tuple(types),
        timestamptz=tuple(c for c in columns if types[c] == "timestamp with time zone"),
        timestamp=tuple(c for c in columns if types[c] == "timestamp without time zone"),
        sequence=sequence,
    )


def _table(conn: psycopg.Connection[Any], where: str, name: str) -> tuple[str, str, int]:
    """(schema, table, oid) of the table `name` names; unqualified: through the search path."""
    schema, _, table = name.rpartition(".")
    row = conn.execute(
        "SELECT n.nspname, c.relname, c.oid::int8, c.relkind FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = %s AND CASE WHEN %s = '' THEN pg_table_is_visible(c.oid)"
        " ELSE n.nspname = %s END"
        " ORDER BY array_position(current_schemas(true), n.nspname) LIMIT 1",
        (table, schema, schema),
    ).fetchone()
    if row is None:
        candidates = [
            str(r[0])
            for r in conn.execute(
                "SELECT CASE WHEN pg_table_is_visible(c.oid) THEN c.relname"
                " ELSE n.nspname || '.' || c.relname END FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.relkind IN ('r', 'p')"
                " AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgsse')"
            ).fetchall()
        ]
        raise ConfigError(f'{where}.table: no table "{name}"{_hint(name, candidates)}')
    if row[3] not in ("r", "p"):
        raise ConfigError(f'{where}.table: "{name}" is not a table (views have no triggers)')
    return str(row[0]), str(row[1]), int(row[2])


def _hint(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))
