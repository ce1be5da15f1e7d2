"""The soak's writer: one connection inserting ~`rate` rows/s, as an application would.

Every 50th row is 20-100 kB (sent by the trigger as a reference, read by the listener), every
40th statement a 10-row INSERT. One connection and one statement at a time, so rows commit in
id order: the exact account can then ask for every row once, in id order. It reconnects
through outages; a statement whose connection died may or may not have committed, which is
why the account reads what is in the table rather than trusting this list.
"""

from __future__ import annotations

import random
import threading
import time

import psycopg

ROBOTS = ("r1", "r2", None)
LARGE_EVERY = 50
MULTI_EVERY = 40
MULTI_ROWS = 10
LARGE_TEXT = "大きな行 large row; " * 8_000  # 1.5 bytes a character in UTF-8


class Writer(threading.Thread):
    def __init__(self, url: str, sessions: list[str], rate: float, seed: int) -> None:
        super().__init__(name="soak-writer", daemon=True)
        self.url, self.sessions, self.rate = url, sessions, rate
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.rows = self.statements = self.large = self.multi = self.failures = 0
        self.commit_times: dict[int, float] = {}

    def run(self) -> None:
        conn: psycopg.Connection[tuple[int]] | None = None
        due = time.monotonic()
        while not self.stop_event.is_set():
            count = MULTI_ROWS if (self.statements + 1) % MULTI_EVERY == 0 else 1
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
                self._insert(conn, count)
            except psycopg.OperationalError:
                self.failures += 1
                conn = None
                self.stop_event.wait(0.1)
                continue
            due += count / self.rate
            self.stop_event.wait(max(0.0, due - time.monotonic()))
        if conn is not None:
            conn.close()

    def _insert(self, conn: psycopg.Connection[tuple[int]], count: int) -> None:
        values = [self._row() for _ in range(count)]
        placeholders = ", ".join(["(%s, %s, %s)"] * count)
        params = [value for row in values for value in row]
        cursor = conn.execute(
            f"INSERT INTO messages (session_id, robot_id, content) VALUES {placeholders}"
            " RETURNING id".encode(),
            params,
        )
        now = time.monotonic()
        for (row_id,) in cursor.fetchall():
            self.commit_times[int(row_id)] = now
        self.statements += 1
        self.rows += count
        self.multi += count > 1

    def _row(self) -> tuple[str, str | None, str]:
        number = self.rows + 1 + self.rng.random()  # unique enough to tell rows apart
        content = f"soak row {number:.6f}"
        if self.rng.randrange(LARGE_EVERY) == 0:
            self.large += 1
            content += " " + LARGE_TEXT[: self.rng.randint(20_000, 100_000) * 2 // 3]
        return self.rng.choice(self.sessions), self.rng.choice(ROBOTS), content

    def stop(self) -> None:
        self.stop_event.set()
        self.join(15)
