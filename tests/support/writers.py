"""Rows written into the test cluster from outside the broker, as applications write them:
a steady writer that rides out outages, a round-robin writer over sessions, bulk rows."""

from __future__ import annotations

import threading
import time

import psycopg

from tests.support.database import Database


class Writer(threading.Thread):
    """Inserts rows for `session` until stopped, reconnecting through outages."""

    def __init__(self, database: Database, session: str, rate: float = 100.0) -> None:
        super().__init__(daemon=True)
        self.database, self.session, self.rate = database, session, rate
        self.stop_event = threading.Event()
        self.committed = 0
        self.failures = 0

    def run(self) -> None:
        conn: psycopg.Connection[object] | None = None
        while not self.stop_event.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.database.url, autocommit=True, connect_timeout=2)
                conn.execute(
                    "INSERT INTO messages (session_id, content) VALUES (%s, %s)",
                    (self.session, f"w{self.committed}"),
                )
                self.committed += 1
            except psycopg.OperationalError:
                self.failures += 1
                conn = None
                self.stop_event.wait(0.1)
            self.stop_event.wait(1 / self.rate)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def concurrent_writer(
    database: Database,
    sessions: list[str],
    stop: threading.Event,
    inserted: dict[str, list[int]],
    rate: float,
) -> None:
    """Insert round robin over `sessions` at about `rate` rows/s until `stop`."""
    with psycopg.connect(database.url, autocommit=True) as conn:
        n = 0
        next_at = time.monotonic()
        while not stop.is_set():
            session = sessions[n % len(sessions)]
            row = conn.execute(
                "INSERT INTO messages (session_id, content) VALUES (%s, %s) RETURNING id",
                (session, f"w{n}"),
            ).fetchone()
            assert row is not None
            inserted[session].append(int(row[0]))
            n += 1
            next_at += 1 / rate
            time.sleep(max(0.0, next_at - time.monotonic()))


def rows_of(database: Database, session_id: str, count: int, size: int) -> None:
    with database.connect() as conn:
        conn.execute(
            "INSERT INTO messages (session_id, content)"
            " SELECT %s, repeat('x', %s) FROM generate_series(1, %s)",
            (session_id, size, count),
        )
