"""WAL capture: the emit trigger, the slot `pgsse migrate` makes, `SlotReader`.

Each test gets a database of its own in the session's cluster (which runs with
wal_level=logical, as every embedded server does), migrated with BROKER_CAPTURE=wal and a slot
of its own, so the other tests' NOTIFY trigger is untouched.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from broker import slots
from broker.cli import main
from broker.config.settings import Settings
from broker.database import drop_capture, migrate, sql_dir
from broker.errors import BrokerError, ConfigError
from broker.feeds.wal import SlotReader, slot_lag
from broker.feeds.walstream import SlotStream
from tests.support.database import Database, invalidate_slots
from tests.support.wal import WalDatabase

TIMEOUT = 10.0
Reader = SlotReader | SlotStream


@pytest.fixture
async def reader(waldb: WalDatabase) -> AsyncIterator[SlotReader]:
    async with await waldb.reader_connection() as conn:
        yield SlotReader(conn, waldb.slot, poll_seconds=0.005)


@pytest.fixture(params=["sql", "stream"])
async def any_reader(request: pytest.FixtureRequest, waldb: WalDatabase) -> AsyncIterator[Reader]:
    """A reader of each transport: SQL polling (`SlotReader`) and streaming (`SlotStream`)."""
    async with open_reader(waldb, request.param) as reader:
        yield reader


@asynccontextmanager
async def open_reader(waldb: WalDatabase, kind: str) -> AsyncIterator[Reader]:
    if kind == "stream":
        async with asyncio.timeout(TIMEOUT):
            while True:  # the last stream's walsender may still be ending
                try:
                    stream = await SlotStream(waldb.url, waldb.slot).__aenter__()
                    break
                except slots.SlotBusy:
                    await asyncio.sleep(0.05)
        try:
            yield stream
        finally:
            await stream.__aexit__(None, None, None)
        return
    async with await waldb.reader_connection() as conn:
        yield SlotReader(conn, waldb.slot, poll_seconds=0.005)


async def take(reader: Reader) -> list[dict[str, Any]]:
    """The next batch, bounded in time, as the rows' JSON (signatures stripped)."""
    async with asyncio.timeout(TIMEOUT):
        batch = await reader.next()
    return [json.loads(payload[64:]) for payload in batch]


async def nothing_within(reader: Reader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await reader.next()
    except TimeoutError:
        return True
    return False


def test_the_embedded_server_runs_with_logical_wal(database: Database) -> None:
    assert database.query("SHOW wal_level") == [("logical",)]


async def test_payloads_are_signed_and_come_in_commit_order(
    waldb: WalDatabase, any_reader: Reader
) -> None:
    with waldb.connect() as first:
        first.execute("BEGIN")
        early = first.execute(
            "INSERT INTO messages (session_id, content) VALUES ('s', 'early') RETURNING id"
        ).fetchone()
        late = waldb.insert("s", "late")  # a higher id, committed first
        first.execute("COMMIT")
    assert early is not None and early[0] < late
    async with asyncio.timeout(TIMEOUT):
        batch = await any_reader.next()
    while len(batch) < 2:  # two commits may be read in two polls
        await any_reader.confirm()
        batch += await asyncio.wait_for(any_reader.next(), TIMEOUT)
    key = waldb.key()
    rows = [json.loads(key.verify(payload)) for payload in batch]
    assert [row["id"] for row in rows] == [str(late), str(early[0])]
    assert [row["content"] for row in rows] == ["late", "early"]


async def test_a_rolled_back_row_never_appears(waldb: WalDatabase, any_reader: Reader) -> None:
    with waldb.connect() as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO messages (session_id, content) VALUES ('s', 'undone')")
        conn.execute("ROLLBACK")
    kept = waldb.insert("s", "kept")
    rows = await take(any_reader)
    assert [row["id"] for row in rows] == [str(kept)]


@pytest.mark.parametrize("kind", ["sql", "stream"])
async def test_an_unconfirmed_batch_comes_again_and_a_confirmed_one_never(
    waldb: WalDatabase, kind: str
) -> None:
    ids = [str(waldb.insert("s", f"row {n}")) for n in range(3)]
    seen: list[str] = []
    async with open_reader(waldb, kind) as reader:
        while len(seen) < 3:
            seen += [row["id"] for row in await take(reader)]
            await reader.confirm()  # this reader hands each batch on
    assert seen == ids
    more = [str(waldb.insert("s", f"more {n}")) for n in range(2)]
    async with open_reader(waldb, kind) as stopped:  # killed before confirming
        first = await take(stopped)
    assert [row["id"] for row in first] == more[: len(first)]
    async with open_reader(waldb, kind) as successor:  # its successor: those rows again
        got = [row["id"] for row in await take(successor)]
        while len(got) < 2:
            await successor.confirm()
            got += [row["id"] for row in await take(successor)]
        assert got == more
        await successor.confirm()
        assert await nothing_within(successor, 0.5)
    async with open_reader(waldb, kind) as later:  # and after confirming: never again
        assert await nothing_within(later, 0.5)


async def test_a_50_mb_row_is_sent_as_a_reference(waldb: WalDatabase, any_reader: Reader) -> None:
    big = waldb.insert("s", "x" * 50_000_000)
    rows = await take(any_reader)
    assert rows == [{"id": str(big), "ref": True, "sessionId": "s", "robotId": None}]


async def test_slot_lag_in_bytes_and_seconds(waldb: WalDatabase, reader: SlotReader) -> None:
    async with await waldb.reader_connection() as conn:
        quiet = await slot_lag(conn, waldb.slot)
        assert quiet.seconds == 0.0 and not quiet.invalidated
        for n in range(20):
            waldb.insert("s", f"lagging {n}")
        await asyncio.sleep(0.3)  # the oldest unread row is this old at least
        behind = await slot_lag(conn, waldb.slot)
        assert behind.bytes > quiet.bytes + 20 * 100
        assert behind.seconds is not None and behind.seconds >= 0.3
        read = 0
        while read < 20:
            read += len(await take(reader))
            await reader.confirm()
        caught_up = await slot_lag(conn, waldb.slot)
    assert caught_up.seconds == 0.0
    assert caught_up.bytes < behind.bytes


async def test_an_invalidated_slot_is_one_clear_error(
    database: Database, waldb: WalDatabase, reader: SlotReader
) -> None:
    waldb.insert("s", "before")
    invalidate_slots(database)
    async with await waldb.reader_connection() as conn:
        lag = await slot_lag(conn, waldb.slot)
    assert lag.invalidated and lag.seconds is None
    with pytest.raises(slots.SlotInvalidated, match="invalidated by PostgreSQL"):
        await asyncio.wait_for(reader.next(), TIMEOUT)
    with pytest.raises(slots.SlotInvalidated, match="invalidated by PostgreSQL"):
        async with SlotStream(waldb.url, waldb.slot):
            pass


async def test_a_missing_slot_says_to_migrate(waldb: WalDatabase) -> None:
    async with await waldb.reader_connection() as conn:
        with pytest.raises(slots.SlotMissing, match="pgsse migrate"):
            await SlotReader(conn, "no_such_slot").next()
    with pytest.raises(slots.SlotMissing, match="pgsse migrate"):
        async with SlotStream(waldb.url, "no_such_slot"):
            pass


async def test_a_second_stream_on_the_slot_is_busy(waldb: WalDatabase) -> None:
    async with SlotStream(waldb.url, waldb.slot):
        with pytest.raises(slots.SlotBusy, match="another session"):
            async with SlotStream(waldb.url, waldb.slot):
                pass


def test_migrate_is_idempotent_and_drop_capture_restores_notify(waldb: WalDatabase) -> None:
    migrate(waldb.url, capture="wal", slot=waldb.slot)  # again: nothing new

    def state() -> tuple[int, int, str]:
        with waldb.connect() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s),"
                " (SELECT count(*) FROM pg_publication WHERE pubname = %s),"
                " (SELECT prosrc FROM pg_proc WHERE proname = 'notify_new_message')",
                (waldb.slot, slots.PUBLICATION),
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), str(row[2])

    count, publications, source = state()
    assert (count, publications) == (1, 1)
    assert "pg_logical_emit_message" in source and "pg_notify" not in source
    assert drop_capture(waldb.url, waldb.slot) is True
    count, publications, source = state()
    assert (count, publications) == (0, 0)
    assert "pg_notify" in source and "pg_logical_emit_message" not in source
    assert drop_capture(waldb.url, waldb.slot) is False


def test_a_slot_of_another_database_is_refused(database: Database, waldb: WalDatabase) -> None:
    with pytest.raises(BrokerError, match="BROKER_CAPTURE_SLOT"):
        migrate(database.url, capture="wal", slot=waldb.slot)
    made = database.query("SELECT count(*) FROM pg_publication WHERE pubname = 'pgsse_capture'")
    assert made == [(0,)]  # refused before anything was made
    assert (
        "pg_notify("
        in database.query("SELECT prosrc FROM pg_proc WHERE proname = %s", ("notify_new_message",))[
            0
        ][0]
    )


def test_the_wal_trigger_differs_from_notify_in_its_step_only() -> None:
    notify_sql = (sql_dir() / "002_notify.sql").read_text()
    function = slots.wal_trigger_sql(notify_sql)
    assert function.startswith("CREATE OR REPLACE FUNCTION notify_new_message()")
    assert function.count("pg_logical_emit_message(true, 'pgsse_messages', payload)") == 1
    assert (
        function.replace(
            slots.capture_step("wal", slots.PREFIX, "payload"),
            slots.capture_step("notify", slots.PREFIX, "payload"),
        )
        in notify_sql
    )
    with pytest.raises(BrokerError, match="expected one"):
        slots.wal_trigger_sql(notify_sql.replace("pg_notify", "pg_notify_other"))


def test_broker_capture_is_notify_or_wal() -> None:
    assert Settings.load({}).capture == "notify"
    assert Settings.load({"BROKER_CAPTURE": "wal"}).capture == "wal"
    with pytest.raises(ConfigError, match="BROKER_CAPTURE"):
        Settings.load({"BROKER_CAPTURE": "logical"})
    with pytest.raises(ConfigError, match="BROKER_CAPTURE_SLOT"):
        Settings.load({"BROKER_CAPTURE_SLOT": "Bad-Name"})


def test_pgsse_migrate_drop_capture(
    waldb: WalDatabase, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", waldb.url)
    monkeypatch.setenv("BROKER_CAPTURE_SLOT", waldb.slot)
    monkeypatch.setenv("BROKER_CAPTURE", "wal")
    assert main(["migrate", "--drop-capture"]) == 1  # contradictory: refused
    assert "unset BROKER_CAPTURE" in capsys.readouterr().err
    monkeypatch.delenv("BROKER_CAPTURE")
    assert main(["migrate", "--drop-capture"]) == 0
    assert capsys.readouterr().out == f"capture slot {waldb.slot}: dropped\n"


async def test_the_slot_restart_point_follows_the_reader(
    waldb: WalDatabase, reader: SlotReader
) -> None:
    """Decoding starts at restart_lsn: left where it was (PostgreSQL moves it every 15 s at
    best), every poll would decode all the WAL since again."""

    def wal_and_restart_lag() -> tuple[int, int]:
        with waldb.connect() as conn:
            row = conn.execute(
                "SELECT (pg_current_wal_lsn() - '0/0')::bigint,"
                " (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (waldb.slot,),
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    start, _ = wal_and_restart_lag()
    for _ in range(3):
        with waldb.connect() as conn:
            conn.execute(
                "INSERT INTO messages (session_id, content)"
                " SELECT 's', repeat('x', 1000) FROM generate_series(1, 300)"
            )
        read = 0
        while read < 300:
            read += len(await take(reader))
            await reader.confirm()
    end, lag = wal_and_restart_lag()
    assert end - start > 3 * 300 * 1000
    assert lag < (end - start) / 2  # about one round's: the slot moved while rows flowed


async def test_others_writes_do_not_hold_the_slot_back(
    waldb: WalDatabase, reader: SlotReader
) -> None:
    """WAL of tables without capture is decoded once: empty polls move the slot past it."""
    with waldb.connect() as conn:
        conn.execute("CREATE TABLE other (x text)")
        conn.execute("INSERT INTO other SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
        assert await reader.poll() == []
        row = conn.execute(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (waldb.slot,),
        ).fetchone()
    assert row is not None
    assert row[0] < 65_536  # was 2 MB behind before the poll
    kept = waldb.insert("s", "after")
    assert [row["id"] for row in await take(reader)] == [str(kept)]
