"""The test cluster as tests see it: its URL, plain-SQL helpers, and stop/start for faults.

`conftest.database` makes one per session; tests and helpers import the class from here (test
modules never import one another, nor conftest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from broker.database import EmbeddedPostgres
from broker.feeds.listener import APPLICATION_NAME as LISTENER_NAME
from broker.feeds.walcapture import READER_NAME


def chain_modes(path: Path) -> list[str]:
    """`stat -c '%a %U %n'` of `path` and each of its parents, from `/` down."""
    chain = [*reversed(path.parents), path]
    return [f"{p.stat().st_mode & 0o7777:o} {p.owner()} {p}" for p in chain]


class Database:
    """The test cluster: its URL, plain-SQL helpers, and stop/start for fault injection."""

    def __init__(
        self,
        server: EmbeddedPostgres,
        root: Path,
        modes_before: list[str],
        *,
        url: str | None = None,
        capture: str = "notify",
        slot: str | None = None,
    ) -> None:
        self.server = server
        self.url = server.url if url is None else url
        self.root = root  # the temporary directory BROKER_DATA_DIR is in
        self.modes_before = modes_before  # chain_modes(root) before the cluster started
        self.capture = capture  # how it was migrated: BROKER_CAPTURE
        self.slot = slot  # with capture "wal": its slot

    def sibling(self, name: str, *, capture: str = "notify", slot: str | None = None) -> Database:
        """Database `name` of the same cluster (made by the caller)."""
        url = self.server.url.replace("/postgres?", f"/{name}?", 1)
        return Database(
            self.server, self.root, self.modes_before, url=url, capture=capture, slot=slot
        )

    def broker_env(self) -> dict[str, str]:
        """The settings a broker serving this database needs besides DATABASE_URL."""
        if self.capture != "wal":
            return {}
        assert self.slot is not None
        return {"BROKER_CAPTURE": "wal", "BROKER_CAPTURE_SLOT": self.slot}

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def insert(
        self, session_id: str, content: str = "hello", robot_id: str | None = None, **columns: Any
    ) -> int:
        """INSERT with plain SQL, as an application would; returns the row id."""
        names = ["session_id", "content", "robot_id", *columns]
        values = [session_id, content, robot_id, *columns.values()]
        query = psycopg.sql.SQL("INSERT INTO messages ({}) VALUES ({}) RETURNING id").format(
            psycopg.sql.SQL(", ").join(map(psycopg.sql.Identifier, names)),
            psycopg.sql.SQL(", ").join(psycopg.sql.Placeholder() * len(values)),
        )
        with self.connect() as conn:
            row = conn.execute(query, values).fetchone()
        assert row is not None
        return int(row[0])

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return conn.execute(sql.encode(), params).fetchall()

    def listening_backends(self) -> int:
        """Brokers' listening connections (they connect as `listener.APPLICATION_NAME`)."""
        rows = self.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (LISTENER_NAME,),
        )
        return int(rows[0][0])

    def terminate_listeners(self) -> int:
        """pg_terminate_backend every broker's listening connection, and the capture slot's
        stream (wal mode); how many there were."""
        rows = self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name IN (%s, %s)",
            (LISTENER_NAME, READER_NAME),
        )
        return len(rows)


def invalidate_slots(database: Database) -> None:
    """Have PostgreSQL invalidate every replication slot not read right now: WAL beyond a
    1 MB `max_slot_wal_keep_size`, then a checkpoint drops the segments they need."""
    with database.connect() as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            for _ in range(4):
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS filler (x text)")
                conn.execute(
                    "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)"
                )
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
        finally:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            conn.execute("SELECT pg_reload_conf()")


def stored_ids(database: Database, session: str) -> list[int]:
    rows = database.query("SELECT id FROM messages WHERE session_id = %s ORDER BY id", (session,))
    return [int(row[0]) for row in rows]
