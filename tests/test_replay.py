"""broker.replay in process, on the real table: what a new stream is sent before live (resume
from the journal or the table, history), merged with what the hub routes meanwhile so that
every row comes once, none is missing, and none older than the resume point follows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import psycopg
import pytest

from broker import replay as replay_module
from broker.events import Message
from broker.feeds import changelog
from broker.hub import Hub, Subscriber
from broker.replay import RESET, Item, Replay, Reset
from broker.store import Store
from tests.support.database import Database
from tests.support.feeds import Scratch, chat_database


@pytest.fixture
async def store(database: Database) -> AsyncIterator[Store]:
    async with Store.open(database.url) as store:
        yield store


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_module, "REPLAY_PAGE", 2)


async def row(store: Store, message_id: int) -> Message:
    message = await store.get(message_id)
    assert message is not None
    return message


def live(subscriber: Subscriber) -> list[int]:
    return [event.id for event in subscriber.take()]


async def read(replay: Replay | None) -> list[list[int]]:
    assert replay is not None
    return [[message.id for message in page] async for page in replay.pages()]


def hub() -> Hub:
    return Hub(max_subscribers=10, queue_size=100)


async def opened(
    store: Store,
    session_id: str,
    *,
    after: int | None = None,
    history: int | None = None,
    limit: int = 100,
    delivered: tuple[int, ...] = (),
    robot_id: str | None = None,
) -> tuple[Hub, Subscriber, Replay | None]:
    """A hub that routed the rows `delivered`, a new stream on it, and that stream's replay."""
    routing = hub()
    for message_id in delivered:
        routing.publish(await row(store, message_id))
    subscriber = routing.subscribe(session_id, robot_id)
    replay = Replay.plan(
        routing, store, subscriber, last_event_id=after, history=history, limit=limit
    )
    return routing, subscriber, replay


async def test_a_resume_from_a_row_the_journal_holds_follows_delivery_order(
    database: Database, store: Store, session_id: str
) -> None:
    first, second, third = (database.insert(session_id, f"m{i}") for i in range(3))
    other = database.insert("elsewhere")
    routing = hub()
    for message_id in (first, third, other, second):  # commit order, not id order
        routing.publish(await row(store, message_id))
    subscriber = routing.subscribe(session_id, None)
    replay = Replay.plan(routing, store, subscriber, last_event_id=first, history=None, limit=100)
    assert replay is not None and replay.journal_ids == [third, second]
    assert await read(replay) == [[third, second]]
    later = database.insert(session_id, "later")
    routing.publish(await row(store, later))
    assert live(subscriber) == [later]


async def test_a_resume_from_the_table_merges_with_live_rows_once_each(
    database: Database, store: Store, session_id: str, small_pages: None
) -> None:
    """The journal does not hold the resume id (this process started after it): rows above it
    are read by id; copies queued before a read are dropped, rows routed after are skipped."""
    older = database.insert(session_id, "older")  # commits after the resume, id below it
    resumed_from = database.insert(session_id, "seen")
    rows = [database.insert(session_id, f"m{i}") for i in range(3)]
    routing = hub()
    subscriber = routing.subscribe(session_id, None)
    replay = Replay.plan(
        routing, store, subscriber, last_event_id=resumed_from, history=None, limit=100
    )
    assert replay is not None and replay.journal_ids is None
    routing.publish(await row(store, rows[0]))  # routed before the first read: queued
    routing.publish(await row(store, older))  # up to the resume id counts as seen
    pages: list[list[int]] = []
    async for page in replay.pages():
        pages.append([message.id for message in page])
        if len(pages) == 1:
            routing.publish(await row(store, rows[2]))  # queued before the page that holds it
            routing.publish(await row(store, rows[1]))  # in flight, sent already: skipped
    assert pages == [rows[:2], rows[2:]]
    assert subscriber.queued == 0  # each copy was dropped by the read that sent the row
    newest = database.insert(session_id, "newest")
    routing.publish(await row(store, newest))
    assert live(subscriber) == [newest]


async def test_history_sends_the_last_rows_oldest_first_then_only_newer_rows(
    database: Database, store: Store, session_id: str
) -> None:
    rows = [database.insert(session_id, f"m{i}") for i in range(3)]
    routing, subscriber, replay = await opened(store, session_id, history=2)
    assert await read(replay) == [rows[1:]]
    newest = database.insert(session_id, "newest")
    for message_id in (rows[0], rows[2], newest):  # older than the history: never sent
        routing.publish(await row(store, message_id))
    assert live(subscriber) == [newest]


async def test_history_of_a_session_with_no_rows_is_empty_and_no_replay_is_none(
    store: Store, session_id: str
) -> None:
    assert await read((await opened(store, session_id, history=5))[2]) == []
    assert (await opened(store, session_id))[2] is None


async def test_with_a_last_event_id_history_is_ignored(
    database: Database, store: Store, session_id: str
) -> None:
    rows = [database.insert(session_id, f"m{i}") for i in range(4)]
    _, _, replay = await opened(store, session_id, after=rows[2], history=4)
    assert await read(replay) == [rows[3:]]


@pytest.mark.parametrize("from_journal", [False, True])
async def test_replay_stops_one_row_past_its_limit(
    database: Database, store: Store, session_id: str, small_pages: None, from_journal: bool
) -> None:
    """`limit` + 1 rows tell the stream the limit was reached; nothing more is read."""
    start = database.insert(session_id, "start")
    rows = [database.insert(session_id, f"m{i}") for i in range(6)]
    delivered = (start, *rows) if from_journal else ()
    _, _, replay = await opened(store, session_id, after=start, limit=2, delivered=delivered)
    assert await read(replay) == [rows[:2], rows[2:3]]


@pytest.mark.parametrize("from_journal", [False, True])
async def test_pages_are_cut_at_their_byte_budget_one_row_at_least(
    database: Database,
    store: Store,
    session_id: str,
    monkeypatch: pytest.MonkeyPatch,
    from_journal: bool,
) -> None:
    monkeypatch.setattr(replay_module, "REPLAY_PAGE_BYTES", 3_000)
    start = database.insert(session_id, "start")
    rows = [database.insert(session_id, "x" * 2_000) for _ in range(3)]
    delivered = (start, *rows) if from_journal else ()
    _, _, replay = await opened(store, session_id, after=start, delivered=delivered)
    pages = await read(replay)
    assert [i for page in pages for i in page] == rows
    assert max(len(page) for page in pages) <= 2  # about 3,000 bytes: not all three at once


async def test_a_robot_filter_is_applied_to_the_rows_read(
    database: Database, store: Store, session_id: str
) -> None:
    start = database.insert(session_id, "start")
    mine = database.insert(session_id, "mine", robot_id="r1")
    database.insert(session_id, "theirs", robot_id="r2")
    database.insert(session_id, "none")
    _, _, replay = await opened(store, session_id, after=start, robot_id="r1")
    assert await read(replay) == [[mine]]


# The messages feed with updates and deletes declared: rows and logged changes, merged.


@pytest.fixture
async def logged(database: Database, tmp_path: Path) -> AsyncIterator[tuple[Scratch, Store]]:
    """A database of its own whose messages feed logs its updates and deletes, and a store."""
    with chat_database(database, tmp_path) as (scratch, _):
        async with Store.open(scratch.url) as store:
            yield scratch, store


def insert(scratch: Scratch, session_id: str, content: str = "hello") -> int:
    [(row_id,)] = scratch.query(
        "INSERT INTO messages (session_id, content) VALUES (%s, %s) RETURNING id",
        (session_id, content),
    )
    return int(row_id)


def change(scratch: Scratch, statement: str, *params: object) -> int:
    """Run an UPDATE or DELETE of one row; the position of the change it logged."""
    scratch.execute(statement, params)
    [(position,)] = scratch.query("SELECT max(position) FROM pgsse.changes")
    return int(position)


def planned(
    routing: Hub, store: Store, session_id: str, *, after: int | None, history: int | None = None
) -> tuple[Subscriber, Replay]:
    """A new stream of `session_id` and its replay, with the messages feed's changes."""
    subscriber = routing.subscribe(session_id, None)
    replay = Replay.plan(
        routing, store, subscriber, last_event_id=after, history=history, limit=100, changes=True
    )
    assert replay is not None
    return subscriber, replay


def delivered_row(row_id: int, session_id: str) -> Message:
    """A row as it was routed (it may since be gone from the table)."""
    return Message(row_id, session_id, None, "hello", False, True, None, "2026-01-01T00:00:00.000Z")


def kinds(replay: Replay, items: list[Item]) -> list[str]:
    return [orjson.loads(replay.encode(item).split(b"data: ", 1)[1])["type"] for item in items]


def positions(pages: list[list[Item]]) -> list[int]:
    """The SSE ids of the items of `pages` (a `reset` has none)."""
    items = [item for page in pages for item in page]
    return [replay_module.position(item) for item in items if not isinstance(item, Reset)]


async def all_pages(replay: Replay | None) -> list[list[Item]]:
    assert replay is not None
    return [page async for page in replay.pages()]


def story(scratch: Scratch) -> dict[str, int]:
    """Rows of `a` and `b`; one of `a` edited, one moved to `b`, one deleted; a last row."""
    ids = {"a1": insert(scratch, "a"), "a2": insert(scratch, "a"), "b3": insert(scratch, "b")}
    ids["edit"] = change(scratch, "UPDATE messages SET content = 'fixed' WHERE id = %s", ids["a1"])
    ids["move"] = change(scratch, "UPDATE messages SET session_id = 'b' WHERE id = %s", ids["a2"])
    ids["recall"] = change(scratch, "DELETE FROM messages WHERE id = %s", ids["a1"])
    ids["a4"] = insert(scratch, "a")
    return ids


async def test_a_resume_by_position_merges_rows_and_changes_in_position_order(
    logged: tuple[Scratch, Store], small_pages: None
) -> None:
    scratch, store = logged
    ids = story(scratch)
    routing = hub()
    for session_id, expected, types in (
        ("a", ["edit", "move", "recall", "a4"], ["updated", "updated", "deleted", "message"]),
        ("b", ["a2", "b3", "move"], ["message", "message", "updated"]),
    ):
        _, replay = planned(routing, store, session_id, after=ids["a1"])
        assert replay.journal_ids is None
        pages = await all_pages(replay)
        assert positions(pages) == [ids[name] for name in expected]
        assert max(map(len, pages)) <= 2
        items = [item for page in pages for item in page]
        assert kinds(replay, items) == [t if t == "message" else f"message_{t}" for t in types]


async def test_a_resume_from_the_journal_sends_rows_and_changes_in_delivery_order(
    logged: tuple[Scratch, Store],
) -> None:
    scratch, store = logged
    ids = story(scratch)
    routing = hub()
    for name in ("a1", "b3", "a2"):  # commit order, not id order
        routing.publish(delivered_row(ids[name], name[0]))
    logged_changes = (await store.changes_after(0, 100)).changes
    assert [c.position for c in logged_changes] == [ids["edit"], ids["move"], ids["recall"]]
    for logged_change in logged_changes:
        routing.publish_change(logged_change)
    routing.publish(await row(store, ids["a4"]))
    _, replay = planned(routing, store, "a", after=ids["a1"])
    assert replay is not None and replay.journal_ids is not None
    # a2 moved to `b`: the table no longer gives it to `a`; its move does (old route).
    expected = [ids[name] for name in ("edit", "move", "recall", "a4")]
    assert positions(await all_pages(replay)) == expected
    assert replay.journal_changes == {ids["edit"], ids["move"], ids["recall"]}


async def test_changes_routed_live_around_a_replay_come_once(
    logged: tuple[Scratch, Store],
) -> None:
    scratch, store = logged
    start = insert(scratch, "a")
    routing = hub()
    subscriber, replay = planned(routing, store, "a", after=start)
    edit = change(scratch, "UPDATE messages SET content = 'x' WHERE id = %s", start)
    [queued] = (await store.changes_after(start, 10)).changes
    routing.publish_change(queued)  # routed before the read: dropped from the queue
    assert positions(await all_pages(replay)) == [edit]
    assert live(subscriber) == []
    recall = change(scratch, "DELETE FROM messages WHERE id = %s", start)
    [_, deleted] = (await store.changes_after(start, 10)).changes
    routing.publish_change(deleted)
    assert live(subscriber) == [recall]


async def test_a_resume_from_before_the_pruned_log_gets_reset_then_live(
    logged: tuple[Scratch, Store],
) -> None:
    scratch, store = logged
    ids = story(scratch)
    routing = hub()
    routing.publish(delivered_row(ids["a1"], "a"))
    routing.publish_change((await store.changes_after(0, 100)).changes[0])  # the edit
    async with await psycopg.AsyncConnection.connect(scratch.url, autocommit=True) as conn:
        assert await changelog.prune(conn, 0) == 3
    for after in (ids["a1"], ids["a2"]):  # from the journal (its change pruned), by position
        subscriber, replay = planned(routing, store, "a", after=after)
        assert replay is not None and (replay.journal_ids is not None) == (after == ids["a1"])
        pages = await all_pages(replay)
        assert pages == [[RESET]]
        assert replay.encode(RESET) == b'data: {"type":"reset","reason":"history expired"}\n\n'
        newest = insert(scratch, "a")
        routing.publish(await row(store, newest))
        assert live(subscriber) == [newest]
    # After the pruned positions, nothing is lost: no reset.
    subscriber, replay = planned(routing, store, "a", after=ids["recall"])
    assert positions(await all_pages(replay)) == [ids["a4"], newest - 1, newest]


async def test_history_sends_the_last_rows_then_every_change_after_the_oldest(
    logged: tuple[Scratch, Store],
) -> None:
    scratch, store = logged
    rows = [insert(scratch, "a") for _ in range(3)]
    edit = change(scratch, "UPDATE messages SET content = 'x' WHERE id = %s", rows[1])
    old_edit = change(scratch, "UPDATE messages SET content = 'y' WHERE id = %s", rows[0])
    routing = hub()
    _, replay = planned(routing, store, "a", after=None, history=2)
    # Every change after the oldest row sent: the edit of an older row too (a client that
    # does not show it ignores it).
    assert positions(await all_pages(replay)) == [rows[1], rows[2], edit, old_edit]
    async with await psycopg.AsyncConnection.connect(scratch.url, autocommit=True) as conn:
        await changelog.prune(conn, 0)
    _, replay = planned(routing, store, "a", after=None, history=2)
    assert positions(await all_pages(replay)) == rows[1:]  # rows as they stand: no reset


async def test_without_changes_declared_the_log_is_never_read(
    logged: tuple[Scratch, Store],
) -> None:
    scratch, store = logged
    ids = story(scratch)
    scratch.execute("DROP SCHEMA pgsse CASCADE")
    for history, after in ((None, ids["a1"]), (5, None)):
        routing = hub()
        subscriber = routing.subscribe("a", None)
        replay = Replay.plan(
            routing, store, subscriber, last_event_id=after, history=history, limit=100
        )
        assert positions(await all_pages(replay)) == [ids["a4"]]


@pytest.mark.parametrize("from_journal", [False, True])
async def test_pages_of_large_edits_are_cut_at_their_byte_budget(
    logged: tuple[Scratch, Store], monkeypatch: pytest.MonkeyPatch, from_journal: bool
) -> None:
    monkeypatch.setattr(replay_module, "REPLAY_PAGE_BYTES", 3_000)
    scratch, store = logged
    start = insert(scratch, "a")
    rows = [insert(scratch, "a") for _ in range(2)]
    edit = "UPDATE messages SET content = %s WHERE id = %s"
    edits = [change(scratch, edit, c * 2_000, row_id) for c in "xy" for row_id in rows]
    routing = hub()
    if from_journal:
        for row_id in (start, *rows):
            routing.publish(delivered_row(row_id, "a"))
        for logged_change in (await store.changes_after(0, 100)).changes:
            routing.publish_change(logged_change)
    _, replay = planned(routing, store, "a", after=start)
    assert (replay.journal_ids is not None) == from_journal
    pages = await all_pages(replay)
    assert positions(pages) == [*rows, *edits]
    assert max(map(len, pages)) <= 2  # about 3,000 bytes: a row and an edit, or one edit
