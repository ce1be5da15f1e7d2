"""The `capture-cost` scenario: what recording changes in the change log costs writers.

pgbench, synchronous_commit on, no broker (the database's own cost), `--quick`: 5 s a phase,
else 10 s; the phases of one client count run A B C C B A and their means are compared:

- INSERT rows/s on `messages` at 4 and 16 clients with today's trigger (`notify_new_message`:
  one NOTIFY of the row) against the change-log capture the messages feed would use if its
  inserts went through the log as a generic feed's do (`pgsse.capture()`: the row into
  `pgsse.changes`, then one NOTIFY; today's trigger disabled meanwhile). This decides whether
  the messages feed's inserts stay on the table (docs/feeds.md): the bound is 0.85.
- UPDATE rows/s on an orders table (10,000 rows, random row per statement) at 4 and 16
  clients without and with its feed (`events = ["update"]`).
- Both with the change log in capture mode `wal` too (the trigger records the change and
  notifies nothing): what NOTIFY's cluster-wide commit lock costs, apart from the log.

Each phase starts from a vacuumed, checkpointed database with an empty change log.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from broker.config import feeds as feedspec
from broker.database import migrate
from broker.feeds.capture import capture_sql
from tests.bench.scenarios import Context, target

CLIENTS = (4, 16)
ORDERS = 10_000
INSERT_SCRIPT = """\
\\set s random(1, 1000)
INSERT INTO messages (session_id, robot_id, content, intent)
  VALUES ('bench-' || :s, 'robot', 'a chat line of ordinary length: ' || repeat('x', 60), 'chat');
"""
UPDATE_SCRIPT = f"""\
\\set id random(1, {ORDERS})
UPDATE shop.orders SET status = CASE status WHEN 'open' THEN 'paid' ELSE 'open' END,
  total = total + 1, updated_at = now() WHERE id = :id;
"""
SCHEMA = f"""
CREATE SCHEMA IF NOT EXISTS shop;
DROP TABLE IF EXISTS shop.orders;
CREATE TABLE shop.orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id text NOT NULL,
    status      text NOT NULL,
    total       numeric(12, 2) NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO shop.orders (customer_id, status, total)
    SELECT (n % 500)::text, 'open', 10 FROM generate_series(1, {ORDERS}) AS n;
"""
LOG_FEED = """
[feeds.chat]   # messages through the change log, as a generic feed's inserts go
table = "messages"
key = "session_id"
filters = ["robot_id"]
events = ["insert"]
"""
ORDERS_FEED = """
[feeds.orders]
table = "shop.orders"
key = "customer_id"
filters = ["status"]
events = ["update"]
"""


def capture_cost(ctx: Context) -> dict[str, Any]:
    seconds = ctx.pick(10, 5)
    url = ctx.database.url
    pgbench = ctx.database.server.placement.bin_dir / "pgbench"
    scripts = {"insert": ctx.workdir / "insert.sql", "update": ctx.workdir / "update.sql"}
    scripts["insert"].write_text(INSERT_SCRIPT)
    scripts["update"].write_text(UPDATE_SCRIPT)
    chat = ctx.workdir / "chat.toml"
    chat.write_text(LOG_FEED)
    orders = ctx.workdir / "orders.toml"
    orders.write_text(ORDERS_FEED)
    _sql(url, SCHEMA)

    def rate(script: Path, clients: int) -> float:
        _settle(url)
        return _pgbench(pgbench, url, script, clients, seconds)

    def insert_today(clients: int) -> float:
        migrate(url)  # today: notify_new_message only
        return rate(scripts["insert"], clients)

    def insert_logged(clients: int, mode: str = "notify") -> float:
        _install(url, chat, mode)
        _sql(url, "ALTER TABLE messages DISABLE TRIGGER trigger_notify_new_message")
        try:
            return rate(scripts["insert"], clients)
        finally:
            _sql(url, "ALTER TABLE messages ENABLE TRIGGER trigger_notify_new_message")

    def update_plain(clients: int) -> float:
        migrate(url)
        return rate(scripts["update"], clients)

    def update_fed(clients: int, mode: str = "notify") -> float:
        _install(url, orders, mode)
        return rate(scripts["update"], clients)

    inserts: dict[str, dict[str, Any]] = {}
    updates: dict[str, dict[str, Any]] = {}
    try:
        for clients in CLIENTS:
            inserts[f"{clients} clients"] = _figures(
                ("today", "change_log", "change_log_without_notify"),
                _mirrored(
                    [insert_today, insert_logged, lambda c: insert_logged(c, "wal")], clients
                ),
            )
            updates[f"{clients} clients"] = _figures(
                ("without_feed", "with_feed", "with_feed_without_notify"),
                _mirrored([update_plain, update_fed, lambda c: update_fed(c, "wal")], clients),
            )
    finally:
        migrate(url)
        _sql(url, "DROP SCHEMA IF EXISTS shop CASCADE; TRUNCATE pgsse.changes")
    for name, figures in {**inserts, **updates}.items():
        print(f"   {name}: {figures}", flush=True)
    return {
        "seconds_per_phase": seconds,
        "inserts_on_messages": inserts,
        "updates_on_orders": updates,
        "targets": [
            target(
                f"messages INSERT via the change log, {name}: >= 0.85 of today's rows/s",
                figures["ratio"],
                figures["ratio"] >= 0.85,
            )
            for name, figures in inserts.items()
        ],
    }


def _mirrored(phases: list[Callable[[int], float]], clients: int) -> list[dict[str, Any]]:
    """Each phase's rates, run in order then in reverse (A B C C B A), and their mean: a
    machine drifting in speed (other load) weighs on every phase alike."""
    runs: list[list[float]] = [[] for _ in phases]
    for index in [*range(len(phases)), *reversed(range(len(phases)))]:
        runs[index].append(round(phases[index](clients), 1))
    return [{"mean": round(sum(r) / len(r), 1), "runs": r} for r in runs]


def _figures(names: tuple[str, str, str], measured: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows/s of the baseline, the measured phase and the phase without NOTIFY; the ratio of
    the measured phase to the baseline, and every run."""
    figures: dict[str, Any] = {
        f"{n}_rows_per_s": m["mean"] for n, m in zip(names, measured, strict=True)
    }
    base, with_capture = measured[0]["mean"], measured[1]["mean"]
    figures["ratio"] = round(with_capture / base, 3) if base else 0.0
    figures["runs"] = {n: m["runs"] for n, m in zip(names, measured, strict=True)}
    return figures


def _install(url: str, config: Path, mode: str) -> None:
    """`pgsse migrate` with `config`; in capture mode `wal` the trigger notifies nothing (what
    the WAL mode costs the writers: the change log without NOTIFY's commit lock)."""
    migrate(url, config)
    if mode != "notify":
        with psycopg.connect(url, autocommit=True) as conn:
            feeds = feedspec.load(conn, config)
            conn.execute(capture_sql(feeds, mode).encode())


def _pgbench(pgbench: Path, url: str, script: Path, clients: int, seconds: float) -> float:
    """Transactions per second of `script` (one statement each) over `seconds`."""
    env = {**os.environ, "PGOPTIONS": "-c synchronous_commit=on"}
    done = subprocess.run(
        [
            str(pgbench),
            "-n",
            "-f",
            str(script),
            "-c",
            str(clients),
            "-j",
            str(min(clients, 4)),
            "-T",
            str(int(seconds)),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + 60,
        check=True,
    )
    found = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", done.stdout)
    if found is None:
        raise RuntimeError(f"pgbench said: {done.stdout[-500:]} {done.stderr[-500:]}")
    return float(found[1])


def _sql(url: str, text: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(text.encode())


def _settle(url: str) -> None:
    """An empty change log, vacuumed tables and a checkpoint before each phase."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pgsse.changes")
        conn.execute("VACUUM ANALYZE messages")
        conn.execute("VACUUM ANALYZE shop.orders")
        conn.execute("CHECKPOINT")


__all__ = ["capture_cost"]
