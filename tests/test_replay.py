"""broker.replay in process, on the real table: what a new stream is sent before live (resume
from the journal or the table, history), merged with what the hub routes meanwhile so that
every row comes once, none is missing, and none older than the resume point follows."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker import replay as replay_module
from broker.events import Message
from broker.hub import Hub, Subscriber
from broker.replay import Replay
from broker.store import Store
from tests.support.database import Database


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
