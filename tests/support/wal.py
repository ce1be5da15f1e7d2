"""A database of its own per test, migrated with BROKER_CAPTURE=wal and a slot of its own (the
other tests' NOTIFY trigger untouched): the `waldb` fixture of tests/feeds/conftest.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from broker.database import migrate
from broker.signing import RowKey
from tests.support.database import Database

TIMEOUT = 10.0


@dataclass
class WalDatabase:
    url: str
    slot: str

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, autocommit=True)

    def insert(self, session_id: str, content: str = "hello") -> int:
        with self.connect() as conn:
            row = conn.execute(
                "INSERT INTO messages (session_id, content) VALUES (%s, %s) RETURNING id",
                (session_id, content),
            ).fetchone()
        assert row is not None
        return int(row[0])

    def key(self) -> RowKey:
        with self.connect() as conn:
            row = conn.execute("SELECT key FROM pgsse_key").fetchone()
        assert row is not None
        return RowKey(bytes(row[0]))

    def reader_connection(self) -> Any:
        return psycopg.AsyncConnection.connect(self.url, autocommit=True)


@contextmanager
def wal_database(database: Database) -> Iterator[WalDatabase]:
    name = f"wal_{uuid.uuid4().hex[:10]}"
    with database.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = database.url.replace("/postgres?", f"/{name}?", 1)
    wal = WalDatabase(url, f"slot_{name}")
    migrate(url, capture="wal", slot=wal.slot)
    try:
        yield wal
    finally:
        with database.connect() as conn:
            deadline = time.monotonic() + TIMEOUT
            while True:  # a stream's walsender may still be ending
                try:
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE database = %s",
                        (name,),
                    )
                    break
                except psycopg.errors.ObjectInUse:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
