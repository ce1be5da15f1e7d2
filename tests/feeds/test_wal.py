"""WAL capture: the emit trigger, the slot `pgsse migrate` makes, `SlotReader`.

Each test gets a database of its own in the session's cluster (which runs with
wal_level=logical, as every embedded server does), migrated with BROKER_CAPTURE=wal and a slot
of its own, so the other tests' NOTIFY trigger is untouched.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

from broker import slots
from broker.cli import main
from broker.config.settings import Settings
from broker.database import drop_capture, migrate
from broker.errors import BrokerError, ConfigError
from broker.events import Message, Reference, utc_timestamp
from broker.feeds.wal import Item, SlotReader, iso_utc, slot_lag
from broker.feeds.walstream import SlotStream
from broker.store import DEFAULT_MAX_ROW_BYTES, Store
from tests.support.database import Database, invalidate_slots
from tests.support.pgproxy import PostgresProxy
from tests.support.wal import WalDatabase

TIMEOUT = 10.0
Reader = SlotReader | SlotStream


@pytest.fixture
def wal_env(waldb: WalDatabase, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The CLI's environment for `waldb` in wal mode."""
    monkeypatch.setenv("DATABASE_URL", waldb.url)
    monkeypatch.setenv("BROKER_CAPTURE_SLOT", waldb.slot)
    monkeypatch.setenv("BROKER_CAPTURE", "wal")
    return monkeypatch


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
async def open_reader(
    waldb: WalDatabase, kind: str, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
) -> AsyncIterator[Reader]:
    if kind == "stream":
        async with asyncio.timeout(TIMEOUT):
            while True:  # the last stream's walsender may still be ending
                try:
                    stream = SlotStream(waldb.url, waldb.slot, max_row_bytes=max_row_bytes)
                    await stream.__aenter__()
                    break
                except slots.SlotBusy:
                    await asyncio.sleep(0.05)
        try:
            yield stream
        finally:
            await stream.__aexit__(None, None, None)
        return
    async with await waldb.reader_connection() as conn:
        yield SlotReader(conn, waldb.slot, poll_seconds=0.005, max_row_bytes=max_row_bytes)


async def take(reader: Reader) -> list[dict[str, Any]]:
    """The next batch, bounded in time, as the rows' JSON: a decoded row as its event's
    `data`, a reference as `{"id", "ref"}`, a payload as its JSON (signature stripped)."""
    async with asyncio.timeout(TIMEOUT):
        batch = await reader.next()
    return [as_json(item) for item in batch]


def as_json(item: Item) -> dict[str, Any]:
    if isinstance(item, Message):
        return item.as_json()
    if isinstance(item, Reference):
        return {"id": str(item.id), "ref": True}
    parsed: dict[str, Any] = json.loads(item[64:])
    return parsed


async def nothing_within(reader: Reader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            await reader.next()
    except TimeoutError:
        return True
    return False


def test_the_embedded_server_runs_with_logical_wal(database: Database) -> None:
    assert database.query("SHOW wal_level") == [("logical",)]


async def test_rows_come_in_commit_order(waldb: WalDatabase, any_reader: Reader) -> None:
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
    assert all(isinstance(item, Message) for item in batch)  # the table's rows: not signed
    rows = [as_json(item) for item in batch]
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


async def test_a_50_mb_row_is_cut_to_the_row_cap(waldb: WalDatabase, any_reader: Reader) -> None:
    """As `Store` reads it (`BROKER_MAX_ROW_BYTES`, 1 MiB by default)."""
    big = waldb.insert("s", "x" * 50_000_000)
    [row] = await take(any_reader)
    assert row["id"] == str(big) and row["content"] == "x" * DEFAULT_MAX_ROW_BYTES
    assert row["truncated"] is True and row["contentBytes"] == 50_000_000


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


async def test_a_stream_cut_off_without_a_word_fails_at_once(
    waldb: WalDatabase, pgproxy: PostgresProxy
) -> None:
    """The connection ends with no error message before it (a network path or a proxy gone):
    libpq closes its socket as it reads the end, and `next()` raises at once. It hung: the
    reader's callback asked libpq for the closed socket's number, failed, and left the reader
    on that number (under uvloop that aborted the broker). A new stream reads on, from the
    last confirmation the server got."""
    url = pgproxy.to(waldb.url)
    async with SlotStream(url, waldb.slot) as stream:
        first = waldb.insert("s", "before the cut")
        assert [row["id"] for row in await take(stream)] == [str(first)]
        await stream.confirm()
        assert pgproxy.cut() >= 1
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(stream.next(), TIMEOUT)
    after = waldb.insert("s", "after the cut")
    async with open_reader(waldb, "stream") as reader:
        ids: list[str] = []
        while str(after) not in ids:
            ids += [row["id"] for row in await take(reader)]
    # The first row again too, when the cut beat the confirmation to the server.
    assert ids in ([str(after)], [str(first), str(after)])


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

    def capture() -> tuple[list[str], list[tuple[str, bool, bool]]]:
        """The messages table's triggers, and the publications holding it (insert, update)."""
        with waldb.connect() as conn:
            triggers = conn.execute(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'messages'::regclass"
                " AND NOT tgisinternal"
            ).fetchall()
            published = conn.execute(
                "SELECT p.pubname, p.pubinsert, p.pubupdate FROM pg_publication p"
                " JOIN pg_publication_rel r ON r.prpubid = p.oid"
                " WHERE r.prrelid = 'messages'::regclass"
            ).fetchall()
        return [str(name) for (name,) in triggers], [tuple(row) for row in published]

    count, publications, source = state()
    assert (count, publications) == (1, 1)
    assert capture() == ([], [(slots.PUBLICATION, True, False)])  # no trigger: inserts only
    assert drop_capture(waldb.url, waldb.slot) is True
    count, publications, source = state()
    assert (count, publications) == (0, 0)
    assert "pg_notify" in source and "pg_logical_emit_message" not in source
    assert capture() == ([slots.NOTIFY_TRIGGER], [])
    assert drop_capture(waldb.url, waldb.slot) is False
    migrate(waldb.url, capture="wal", slot=waldb.slot)  # and back: the trigger goes again
    migrate(waldb.url, capture="wal", slot=waldb.slot)
    assert capture() == ([], [(slots.PUBLICATION, True, False)])
    migrate(waldb.url, capture="notify")  # notify keeps the slot (warned), not the table
    migrate(waldb.url, capture="notify")
    assert capture() == ([slots.NOTIFY_TRIGGER], [])
    assert drop_capture(waldb.url, waldb.slot) is True


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


def test_migrate_print_shows_the_wal_capture(
    waldb: WalDatabase, wal_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--print"]) == 0
    script = capsys.readouterr().out
    assert f"pg_create_logical_replication_slot('{waldb.slot}', 'pgoutput')" in script
    swap = script.index(slots.wal_capture_sql().rstrip())
    assert script.index("-- sql/002_notify.sql") < swap < script.index("COMMIT;")
    assert "DROP TRIGGER IF EXISTS trigger_notify_new_message ON messages" in script
    wal_env.delenv("BROKER_CAPTURE")
    assert main(["migrate", "--print"]) == 0
    script = capsys.readouterr().out
    assert "-- BROKER_CAPTURE=wal" not in script
    assert "DROP TRIGGER IF EXISTS trigger_notify_new_message" not in script
    assert slots.notify_capture_sql().rstrip() in script


def test_broker_capture_is_notify_or_wal() -> None:
    assert Settings.load({}).capture == "notify"
    assert Settings.load({"BROKER_CAPTURE": "wal"}).capture == "wal"
    with pytest.raises(ConfigError, match="BROKER_CAPTURE"):
        Settings.load({"BROKER_CAPTURE": "logical"})
    with pytest.raises(ConfigError, match="BROKER_CAPTURE_SLOT"):
        Settings.load({"BROKER_CAPTURE_SLOT": "Bad-Name"})


def test_pgsse_migrate_drop_capture(
    waldb: WalDatabase, wal_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--drop-capture"]) == 1  # contradictory: refused
    assert "unset BROKER_CAPTURE" in capsys.readouterr().err
    wal_env.delenv("BROKER_CAPTURE")
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


@pytest.mark.parametrize("kind", ["sql", "stream"])
async def test_decoded_rows_read_as_the_store_reads_them(waldb: WalDatabase, kind: str) -> None:
    """pgoutput's Relation and Insert, decoded: a NULL robot_id, unicode, the timestamps (any
    instant, written in any zone, as `Store` gives it), the row cap cutting a character."""
    cap = 12
    rows = [
        ("s", None, "plain", False, True, None, "2026-12-07 18:03:00.123456+00"),
        ("sé", "r✓", "héllo ✓ 🚀 ünïcode", True, False, "greet", "2026-12-07 20:03:00.9999+02"),
        ("s", "r", "exactly12by", False, True, None, "1999-01-01 00:00:00+00"),
        ("s", "r", "ab🚀🚀🚀", False, False, "i", "2026-06-30 23:59:59.05-07:30"),  # 14 bytes
        ("s", None, "x" * cap + "é", False, True, None, "2026-12-07 18:03:00.000999+00"),
    ]
    with waldb.connect() as conn:  # the database's own settings change nothing either
        for setting in ("TimeZone = 'Asia/Kolkata'", "DateStyle = 'SQL, DMY'"):
            statement = conn.execute(
                "SELECT format('ALTER DATABASE %%I SET ' || %s, current_database())",
                (setting,),
            ).fetchone()
            assert statement is not None
            conn.execute(str(statement[0]).encode())
    with waldb.connect() as conn:
        conn.execute("SET TimeZone = 'America/St_Johns'")  # the writer's zone changes nothing
        ids = [
            int(
                conn.execute(
                    "INSERT INTO messages (session_id, robot_id, content, is_from_bot, is_human,"
                    " intent, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    row,
                ).fetchone()[0]  # type: ignore[index]
            )
            for row in rows
        ]
    decoded: list[Item] = []
    async with open_reader(waldb, kind, max_row_bytes=cap) as reader:
        while len(decoded) < len(rows):
            decoded += await asyncio.wait_for(reader.next(), TIMEOUT)
            await reader.confirm()
    async with await waldb.reader_connection() as conn:
        await conn.execute("SET DateStyle = 'ISO'")
        stored = await Store(conn, max_row_bytes=cap).by_ids(ids)
    assert decoded == [stored[i] for i in ids]
    first, second, exact, cut, cut_e = decoded
    assert isinstance(first, Message) and first.robot_id is None and first.intent is None
    assert first.created_at == "2026-12-07T18:03:00.123Z"
    assert isinstance(second, Message) and second.created_at == "2026-12-07T18:03:00.999Z"
    assert second.robot_id == "r✓" and second.is_from_bot and not second.is_human
    assert isinstance(exact, Message) and exact.content_bytes is None
    assert isinstance(cut, Message) and cut.content == "ab🚀🚀" and cut.content_bytes == 14
    assert isinstance(cut_e, Message) and cut_e.content == "x" * cap and cut_e.content_bytes == 14


def test_iso_utc_writes_what_utc_timestamp_writes() -> None:
    for text in (
        "2026-12-07 18:03:00.123456+00",
        "2026-12-07 18:03:00+00",
        "2026-12-07 18:03:00.1+00",
        "2026-12-07 18:03:00.000999+00",
        "2026-12-07 23:30:00.5+05:30",
        "0999-01-01 00:00:00.999+00",
    ):
        expected = utc_timestamp(datetime.datetime.fromisoformat(text))
        assert iso_utc(text) == expected, text
    with pytest.raises(ValueError):
        iso_utc("infinity")
