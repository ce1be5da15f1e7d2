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


def chain_modes(path: Path) -> list[str]:
    """`stat -c '%a %U %n'` of `path` and each of its parents, from `/` down."""
    chain = [*reversed(path.parents), path]
    return [f"{p.stat().st_mode & 0o7777:o} {p.owner()} {p}" for p in chain]


class Database:
    """The test cluster: its URL, plain-SQL helpers, and stop/start for fault injection."""

    def __init__(self, server: EmbeddedPostgres, root: Path, modes_before: list[str]) -> None:
        self.server = server
        self.url = server.url
        self.root = root  # the temporary directory BROKER_DATA_DIR is in
        self.modes_before = modes_before  # chain_modes(root) before the cluster started

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
        """pg_terminate_backend every broker's listening connection; how many there were."""
        rows = self.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (LISTENER_NAME,),
        )
        return len(rows)


def stored_ids(database: Database, session: str) -> list[int]:
    rows = database.query("SELECT id FROM messages WHERE session_id = %s ORDER BY id", (session,))
    return [int(row[0]) for row in rows]
