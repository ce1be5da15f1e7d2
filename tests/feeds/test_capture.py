"""Capture installed by `pgsse migrate`: each change of a feed's table recorded in the
writer's transaction and notified, whatever its size or types; migrate idempotent, safe from
two processes at once, removing what no feed declares; `--print` runs nothing."""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from broker.database import check_database, migrate
from broker.errors import BrokerError
from broker.feeds.capture import CHANNEL, NOTIFY_LIMIT
from tests.support.database import Database
from tests.support.feeds import (
    ORDERS_CONFIG,
    ORDERS_TABLE,
    Scratch,
    pgsse,
    scratch_database,
    unsigned,
    write_config,
)

ODD_TABLE = """
CREATE TABLE shop.odd (
    id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner    text NOT NULL,
    amount   numeric,
    ratio    float8,
    doc      jsonb,
    tags     text[],
    grid     int[],
    at       timestamptz,
    naive    timestamp,
    day      date,
    blob     bytea,
    body     text
);
"""
ODD_CONFIG = (
    '[feeds.odd]\ntable = "shop.odd"\nkey = "owner"\nevents = ["insert", "update", "delete"]\n'
)


@pytest.fixture
def shop(database: Database, tmp_path: Path) -> Iterator[Scratch]:
    with scratch_database(database) as scratch:
        scratch.execute(ORDERS_TABLE)
        scratch.execute(ODD_TABLE)
        yield scratch


@pytest.fixture
def orders_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, ORDERS_CONFIG + ODD_CONFIG)


def changes(scratch: Scratch, feed: str) -> list[tuple[str, dict[str, Any], Any]]:
    rows = scratch.query(
        "SELECT op::text, data, old FROM pgsse.changes WHERE feed = %s ORDER BY position", (feed,)
    )
    return [(str(op), data, old) for op, data, old in rows]


def notifications(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(unsigned(n.payload)) for n in conn.notifies(timeout=0.5, stop_after=100)]


def test_insert_update_across_filters_and_delete_are_captured(
    shop: Scratch, orders_config: Path
) -> None:
    migrate(shop.url, orders_config)
    with shop.connect() as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with shop.connect() as conn:
            conn.execute(
                "INSERT INTO shop.orders (customer_id, status, region, total, note, updated_at)"
                " VALUES ('42', 'open', 'eu', 12.5, 'ring twice', '2026-01-02 03:04:05.678+02')"
            )
            conn.execute(
                "UPDATE shop.orders SET status = 'paid', region = 'us' WHERE customer_id = '42'"
            )
            conn.execute("UPDATE shop.orders SET note = 'left at door' WHERE customer_id = '42'")
            conn.execute("DELETE FROM shop.orders WHERE customer_id = '42'")
        notified = notifications(listener)
    (order_id,) = {data["id"] for _, data, _ in changes(shop, "orders")}
    row = {
        "id": order_id,
        "customer_id": "42",
        "total": 12.5,
        "updated_at": "2026-01-02T01:04:05.678Z",
    }
    assert changes(shop, "orders") == [
        ("i", {**row, "status": "open", "region": "eu"}, None),
        ("u", {**row, "status": "paid", "region": "us"}, {"status": "open", "region": "eu"}),
        # the note is not a column of the feed: its update records nothing
        ("d", {"id": order_id, "customer_id": "42", "status": "paid", "region": "us"}, None),
    ]
    assert [(n["feed"], n["op"]) for n in notified] == [
        ("orders", "insert"),
        ("orders", "update"),
        ("orders", "delete"),
    ]
    assert notified[1]["old"] == {"status": "open", "region": "eu"}
    assert notified[1]["data"]["status"] == "paid"
    positions = [n["position"] for n in notified]
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert all(n["at"].endswith("Z") and len(n["at"]) == 24 for n in notified)


def test_messages_updates_and_deletes_take_positions_from_its_ids(
    shop: Scratch, orders_config: Path
) -> None:
    migrate(shop.url, orders_config)
    with shop.connect() as conn:
        first = conn.execute(
            "INSERT INTO messages (session_id, robot_id, content)"
            " VALUES ('s', 'r', 'hi') RETURNING id"
        ).fetchone()
        conn.execute("UPDATE messages SET content = 'hello' WHERE session_id = 's'")
        conn.execute("DELETE FROM messages WHERE session_id = 's'")
        second = conn.execute(
            "INSERT INTO messages (session_id, content) VALUES ('s', 'again') RETURNING id"
        ).fetchone()
    assert first is not None and second is not None
    rows = shop.query(
        "SELECT position, op::text FROM pgsse.changes WHERE feed = 'messages' ORDER BY 1"
    )
    assert [op for _, op in rows] == ["u", "d"]  # inserts replay from the table itself
    assert first[0] < rows[0][0] < rows[1][0] < second[0]  # one position space with its rows
    assert changes(shop, "messages")[1][1] == {"id": first[0], "session_id": "s", "robot_id": "r"}
    # today's trigger is untouched: inserts still notify pgsse_messages
    assert shop.query(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'trigger_notify_new_message'"
    ) == [(1,)]


def test_large_rows_and_odd_types_never_fail_a_write(shop: Scratch, orders_config: Path) -> None:
    migrate(shop.url, orders_config)
    big = "x" * (50 * 1024 * 1024)
    with shop.connect() as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with shop.connect() as conn:
            conn.execute(
                "INSERT INTO shop.odd"
                " (owner, amount, ratio, doc, tags, grid, at, naive, day, blob, body)"
                " VALUES ('a', 'NaN', 'Infinity', '{\"k\": [1, null]}', '{x,NULL,\"y z\"}',"
                " '{{1,2},{3,4}}', '2026-03-04 05:06:07.891234+05:30', '2026-03-04 05:06:07.1',"
                " '2026-03-04', '\\x00ff', %s)",
                (big,),
            )
            conn.execute("INSERT INTO shop.odd (owner) VALUES ('b')")  # every other column NULL
            conn.execute(
                "INSERT INTO shop.odd (owner, at, naive, amount) VALUES"
                " ('c', 'infinity', '-infinity', 123456789012345678901234567890.123456789)"
            )
            conn.execute("UPDATE shop.odd SET body = body || 'y', owner = 'a2' WHERE owner = 'a'")
            conn.execute("DELETE FROM shop.odd")
        notified = notifications(listener)
    recorded = changes(shop, "odd")
    assert [op for op, _, _ in recorded] == ["i", "i", "i", "u", "d", "d", "d"]
    first = recorded[0][1]
    assert first["amount"] == "NaN" and first["ratio"] == "Infinity"
    assert first["doc"] == {"k": [1, None]} and first["tags"] == ["x", None, "y z"]
    assert first["grid"] == [[1, 2], [3, 4]] and first["blob"] == "\\x00ff"
    assert (
        first["at"] == "2026-03-03T23:36:07.891Z" and first["naive"] == "2026-03-04T05:06:07.100Z"
    )
    assert first["day"] == "2026-03-04" and len(first["body"]) == len(big)
    assert recorded[1][1]["at"] is None and recorded[1][1]["doc"] is None
    third = recorded[2][1]
    assert (third["at"], third["naive"]) == ("infinity", "-infinity")
    assert third["amount"] == 123456789012345678901234567890.123456789
    assert recorded[3][2] == {"owner": "a"}
    assert len(recorded[3][1]["body"]) == len(big) + 1
    # every notification fits; the large ones are references the broker reads the change by
    assert all(len(orjson.dumps(n)) < NOTIFY_LIMIT for n in notified)
    assert [n.get("ref", False) for n in notified] == [
        True,
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    assert set(notified[0]) == {"feed", "position", "ref"}


def test_migrate_from_two_processes_at_once_then_twice_more_is_idempotent(
    shop: Scratch, orders_config: Path
) -> None:
    def run(_: int) -> Any:
        return pgsse("migrate", "--config", str(orders_config), url=shop.url)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # on a database without pgsse
        runs = list(pool.map(run, range(4)))
    assert [run.returncode for run in runs] == [0] * 4, [run.stderr for run in runs]
    migrate(shop.url, orders_config)
    migrate(shop.url, orders_config)
    assert shop.triggers() == {
        ("messages", "pgsse_capture_messages"),
        ("shop.orders", "pgsse_capture_orders"),
        ("shop.odd", "pgsse_capture_odd"),
    }
    with shop.connect() as conn:
        conn.execute("INSERT INTO shop.orders (customer_id, status) VALUES ('7', 'open')")
    assert len(changes(shop, "orders")) == 1  # one trigger, one change


def test_a_feed_removed_from_the_file_loses_its_trigger(
    shop: Scratch, orders_config: Path, tmp_path: Path
) -> None:
    migrate(shop.url, orders_config)
    assert ("shop.odd", "pgsse_capture_odd") in shop.triggers()
    migrate(shop.url, write_config(tmp_path, ORDERS_CONFIG, name="fewer.toml"))
    assert shop.triggers() == {
        ("messages", "pgsse_capture_messages"),
        ("shop.orders", "pgsse_capture_orders"),
    }
    migrate(shop.url, None)  # no file: the messages feed, inserts only, captures nothing
    assert shop.triggers() == set()
    with shop.connect() as conn:
        conn.execute("INSERT INTO shop.orders (customer_id, status) VALUES ('7', 'open')")
    assert changes(shop, "orders") == []


def test_print_shows_the_sql_and_runs_nothing(shop: Scratch, orders_config: Path) -> None:
    result = pgsse("migrate", "--config", str(orders_config), "--print", url=shop.url)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("BEGIN;\nSELECT pg_advisory_xact_lock(") and script.endswith(
        "COMMIT;\n"
    )
    assert "-- sql/001_messages.sql" in script and "CREATE SCHEMA IF NOT EXISTS pgsse;" in script
    assert (
        'CREATE OR REPLACE TRIGGER "pgsse_capture_orders"\n'
        '    AFTER INSERT OR UPDATE OR DELETE ON "shop"."orders"' in script
    )
    assert 'AFTER UPDATE OR DELETE ON "public"."messages"' in script
    assert not shop.installed() and shop.triggers() == set()
    # and the script is what migrate runs: applied by hand, it installs the same
    shop.execute(script)
    assert shop.triggers() == {
        ("messages", "pgsse_capture_messages"),
        ("shop.orders", "pgsse_capture_orders"),
        ("shop.odd", "pgsse_capture_odd"),
    }


def test_serving_without_migrations_needs_the_feeds_installed(
    shop: Scratch, orders_config: Path
) -> None:
    migrate(shop.url)  # sql/ only: the default feed captures nothing
    check_database(shop.url)
    with pytest.raises(BrokerError, match="feed messages is not installed; run `pgsse migrate"):
        check_database(shop.url, orders_config)
    migrate(shop.url, orders_config)
    check_database(shop.url, orders_config)


def test_writers_need_no_grant_on_the_log_and_no_one_else_may_attach_capture(
    shop: Scratch, orders_config: Path
) -> None:
    migrate(shop.url, orders_config)
    writer, mallory = (f"{name}_{uuid.uuid4().hex[:8]}" for name in ("writer", "mallory"))
    for role in (writer, mallory):
        shop.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)).as_string(None))
    try:
        shop.execute(
            sql.SQL(
                "GRANT USAGE ON SCHEMA shop TO {w}; GRANT INSERT, SELECT ON shop.orders TO {w};"
                " GRANT USAGE, CREATE ON SCHEMA public TO {m};"
                " GRANT USAGE ON SCHEMA pgsse TO {m}"  # as a role reading the log has
            )
            .format(w=sql.Identifier(writer), m=sql.Identifier(mallory))
            .as_string(None)
        )
        as_writer = shop.url.replace("postgres@", f"{writer}@", 1)
        with psycopg.connect(as_writer, autocommit=True) as conn:
            conn.execute("INSERT INTO shop.orders (customer_id, status) VALUES ('9', 'open')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM pgsse.changes")
        assert [op for op, _, _ in changes(shop, "orders")] == ["i"]
        as_mallory = shop.url.replace("postgres@", f"{mallory}@", 1)
        with psycopg.connect(as_mallory, autocommit=True) as conn:
            conn.execute("CREATE TABLE public.mine (id int PRIMARY KEY, customer_id text)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(
                    "CREATE TRIGGER forge AFTER INSERT ON public.mine FOR EACH ROW EXECUTE"
                    " FUNCTION pgsse.capture('orders', 'pgsse.position_seq', '{id}', '{}',"
                    " '{}', '{}', '{}')"
                )
    finally:
        shop.execute("DROP TABLE IF EXISTS public.mine")
        for role in (writer, mallory):
            shop.execute(
                sql.SQL("DROP OWNED BY {r}; DROP ROLE {r}")
                .format(r=sql.Identifier(role))
                .as_string(None)
            )


def test_notifications_are_signed_where_sql_made_a_signing_key(
    shop: Scratch, orders_config: Path
) -> None:
    """As `notify_new_message` signs its own: 64 hex digits of HMAC-SHA256, then the JSON."""
    key = bytes(range(64))
    shop.execute(
        "CREATE TABLE IF NOT EXISTS pgsse_key (one boolean PRIMARY KEY DEFAULT true CHECK (one),"
        " key bytea NOT NULL, inner_pad bytea NOT NULL, outer_pad bytea NOT NULL);"
        " DELETE FROM pgsse_key"
    )
    shop.execute(
        "INSERT INTO pgsse_key VALUES (true, %s, %s, %s)",
        (key, bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)),
    )
    migrate(shop.url, orders_config)
    with shop.connect() as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        shop.execute("INSERT INTO shop.orders (customer_id, status) VALUES ('1', 'open')")
        shop.execute(
            "INSERT INTO shop.orders (customer_id, status) VALUES (%s, 'open')", ("c" * 9000,)
        )
        payloads = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
    assert len(payloads) == 2
    for payload in payloads:
        signature, body = payload[:64], payload[64:]
        assert signature == hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        assert len(payload.encode()) < 8000
    assert orjson.loads(payloads[0][64:])["data"]["customer_id"] == "1"
    assert orjson.loads(payloads[1][64:])["ref"] is True
