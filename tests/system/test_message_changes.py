"""Edits and recalls of messages, through a real broker process: with the feeds file declaring
`[feeds.messages] events = ["insert", "update", "delete"]`, an UPDATE of a message reaches its
streams as `message_updated`, a DELETE as `message_deleted`; an update moving a message
reaches the session it left and the one it joined; a resume gets every change it missed, once,
in commit order; and a resume from before the pruned log gets `reset`, then live."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.database import Database
from tests.support.feeds import Scratch, chat_database
from tests.support.processes import BrokerProcess
from tests.support.redis import RedisServer
from tests.support.sse import SSEClient, SSEEvent, subscribe


@pytest.fixture
def chat(database: Database, tmp_path: Path) -> Iterator[tuple[Scratch, Path]]:
    """A database of its own with the messages feed's changes captured, and the feeds file."""
    with chat_database(database, tmp_path) as chat:
        yield chat


@pytest.fixture
def serve(
    chat: tuple[Scratch, Path], start_broker: Callable[..., BrokerProcess]
) -> Callable[..., BrokerProcess]:
    """Start a broker on the chat database with its feeds file (and `env`)."""
    scratch, config = chat
    return lambda **env: start_broker(DATABASE_URL=scratch.url, BROKER_CONFIG=str(config), **env)


def insert(scratch: Scratch, session_id: str, content: str = "hello") -> int:
    [(row_id,)] = scratch.query(
        "INSERT INTO messages (session_id, content) VALUES (%s, %s) RETURNING id",
        (session_id, content),
    )
    return int(row_id)


def summary(event: SSEEvent) -> tuple[str | None, str | None, str, str]:
    """(type, SSE id, row id, session) of a message event."""
    data: dict[str, Any] = event.json["data"]
    return event.type, event.id, data["id"], data["sessionId"]


async def next_change(client: SSEClient, timeout: float = 10.0) -> SSEEvent:
    """The next message, message_updated or message_deleted event (heartbeats skipped)."""
    kinds = {"message", "message_updated", "message_deleted"}
    return (await client.events_until(lambda e: e.type in kinds, timeout))[-1]


def last_position(scratch: Scratch) -> str:
    [(position,)] = scratch.query("SELECT max(position) FROM pgsse.changes")
    return str(position)


async def test_an_edit_reaches_the_sessions_stream_as_message_updated(
    chat: tuple[Scratch, Path], serve: Callable[[], BrokerProcess]
) -> None:
    scratch, _ = chat
    broker = serve()
    mine, other = await subscribe(broker, sessionId="a"), await subscribe(broker, sessionId="b")
    row = insert(scratch, "a", "helo")
    assert summary(await next_change(mine)) == ("message", str(row), str(row), "a")
    scratch.execute("UPDATE messages SET content = 'hello' WHERE id = %s", (row,))
    edited = await next_change(mine)
    assert summary(edited) == ("message_updated", last_position(scratch), str(row), "a")
    assert edited.json["data"]["content"] == "hello"
    assert set(edited.json["data"]) >= {"robotId", "isFromBot", "isHuman", "intent", "createdAt"}
    theirs = insert(scratch, "b")  # the other session's next event is its own row
    assert summary(await next_change(other)) == ("message", str(theirs), str(theirs), "b")


async def test_an_edit_moving_a_message_reaches_the_session_it_left_and_the_one_it_joined(
    chat: tuple[Scratch, Path], serve: Callable[[], BrokerProcess]
) -> None:
    scratch, _ = chat
    broker = serve()
    left, joined, bystander = [await subscribe(broker, sessionId=s) for s in ("a", "b", "c")]
    row = insert(scratch, "a")
    await next_change(left)
    scratch.execute("UPDATE messages SET session_id = 'b' WHERE id = %s", (row,))
    position = last_position(scratch)
    for client in (left, joined):
        assert summary(await next_change(client)) == ("message_updated", position, str(row), "b")
    mine = insert(scratch, "c")
    assert summary(await next_change(bystander)) == ("message", str(mine), str(mine), "c")


async def test_a_recall_reaches_the_old_sessions_stream_only(
    chat: tuple[Scratch, Path], serve: Callable[[], BrokerProcess]
) -> None:
    scratch, _ = chat
    broker = serve()
    mine, everyone = await subscribe(broker, sessionId="a"), await subscribe(broker)
    other = await subscribe(broker, sessionId="b")
    row = insert(scratch, "a")
    await next_change(mine)
    await next_change(everyone)
    scratch.execute("DELETE FROM messages WHERE id = %s", (row,))
    position = last_position(scratch)
    for client in (mine, everyone):
        recalled = await next_change(client)
        assert recalled.type == "message_deleted" and recalled.id == position
        assert recalled.json["data"] == {"id": str(row), "sessionId": "a", "robotId": None}
    theirs = insert(scratch, "b")
    assert summary(await next_change(other)) == ("message", str(theirs), str(theirs), "b")


async def resumed(broker: BrokerProcess, session_id: str, last_event_id: str) -> SSEClient:
    client = await SSEClient.open(
        broker.port, params={"sessionId": session_id}, headers={"Last-Event-ID": last_event_id}
    )
    assert client.status == 200
    return client


async def test_a_client_away_across_an_insert_an_edit_and_a_recall_gets_exactly_those(
    chat: tuple[Scratch, Path], serve: Callable[[], BrokerProcess]
) -> None:
    scratch, _ = chat
    broker = serve()
    client = await subscribe(broker, sessionId="a")
    gone = insert(scratch, "a", "to recall")
    seen = insert(scratch, "a", "seen")
    for _ in range(2):
        await next_change(client)
    await client.close()
    # Commit order differs from position order: the edit draws its position first and
    # commits last; the insert and the recall commit meanwhile, on connections of their own.
    with scratch.connect() as conn, conn.transaction():
        conn.execute("UPDATE messages SET content = 'edited' WHERE id = %s", (seen,))
        [(edit,)] = conn.execute("SELECT max(position) FROM pgsse.changes").fetchall()
        row = insert(scratch, "a", "new")
        scratch.execute("DELETE FROM messages WHERE id = %s", (gone,))
        recall = last_position(scratch)
    insert(scratch, "b")  # not this session's
    again = await resumed(broker, "a", str(seen))
    got = [summary(await next_change(again)) for _ in range(3)]
    assert got == [
        ("message", str(row), str(row), "a"),
        ("message_deleted", recall, str(gone), "a"),
        ("message_updated", str(edit), str(seen), "a"),
    ]
    live = insert(scratch, "a", "live")
    assert summary(await next_change(again)) == ("message", str(live), str(live), "a")


async def test_a_broker_that_never_saw_them_replays_rows_and_changes_by_position(
    chat: tuple[Scratch, Path], serve: Callable[[], BrokerProcess]
) -> None:
    scratch, _ = chat
    gone = insert(scratch, "a", "to recall")
    seen = insert(scratch, "a", "seen")
    row = insert(scratch, "a", "helo")
    scratch.execute("UPDATE messages SET content = 'hello' WHERE id = %s", (row,))
    edit = last_position(scratch)
    scratch.execute("DELETE FROM messages WHERE id = %s", (gone,))
    recall = last_position(scratch)
    broker = serve()
    client = await resumed(broker, "a", str(seen))
    first = await next_change(client)
    assert summary(first) == ("message", str(row), str(row), "a")
    assert first.json["data"]["content"] == "hello"  # the row as it stands
    assert summary(await next_change(client)) == ("message_updated", edit, str(row), "a")
    assert summary(await next_change(client)) == ("message_deleted", recall, str(gone), "a")
    live = insert(scratch, "a", "live")
    assert summary(await next_change(client)) == ("message", str(live), str(live), "a")


async def test_a_resume_from_before_the_pruned_log_gets_reset_then_live(
    chat: tuple[Scratch, Path], serve: Callable[[], BrokerProcess]
) -> None:
    scratch, _ = chat
    seen = insert(scratch, "a", "seen")
    scratch.execute("UPDATE messages SET content = 'edited' WHERE id = %s", (seen,))
    edit = last_position(scratch)
    # The edit is two hours old: the broker's pruner deletes it at start.
    scratch.execute("UPDATE pgsse.changes SET at = at - interval '2 hours'")
    broker = serve(BROKER_RETENTION="1h")
    broker.wait_until(
        lambda: scratch.query("SELECT count(*) FROM pgsse.changes") == [(0,)], 10, "pruned"
    )
    client = await resumed(broker, "a", str(seen))
    events = await client.events_until(lambda e: e.type == "reset")
    assert [e.type for e in events] == ["connected", "reset"]
    assert events[-1].json == {"type": "reset", "reason": "history expired"}
    live = insert(scratch, "a", "live")
    assert summary(await next_change(client)) == ("message", str(live), str(live), "a")
    # From a position after the pruned ones, nothing is lost: no reset.
    after = await resumed(broker, "a", edit)
    assert summary(await next_change(after)) == ("message", str(live), str(live), "a")


async def test_on_the_bus_edits_and_recalls_reach_every_broker_in_the_shared_order(
    chat: tuple[Scratch, Path], serve: Callable[..., BrokerProcess], redis: RedisServer
) -> None:
    """Two brokers on one bus: a stream on either gets the edit and the recall, and a resume
    on the other broker, from the row, gets exactly them."""
    scratch, _ = chat
    bus = {"BROKER_BUS_URL": redis.url, "BROKER_BUS_STREAM": f"test:{uuid.uuid4().hex[:8]}"}
    first, second = serve(**bus), serve(**bus)
    client = await subscribe(first, sessionId="a")
    row = insert(scratch, "a", "helo")
    scratch.execute("UPDATE messages SET content = 'hello' WHERE id = %s", (row,))
    edit = last_position(scratch)
    scratch.execute("DELETE FROM messages WHERE id = %s", (row,))
    recall = last_position(scratch)
    expected = [
        ("message_updated", edit, str(row), "a"),
        ("message_deleted", recall, str(row), "a"),
    ]
    assert summary(await next_change(client)) == ("message", str(row), str(row), "a")
    assert [summary(await next_change(client)) for _ in range(2)] == expected
    again = await resumed(second, "a", str(row))
    assert [summary(await next_change(again)) for _ in range(2)] == expected
    live = insert(scratch, "a", "live")
    assert summary(await next_change(again)) == ("message", str(live), str(live), "a")


async def test_edits_committed_while_the_listener_is_down_arrive_once_in_order(
    chat: tuple[Scratch, Path], serve: Callable[..., BrokerProcess], database: Database
) -> None:
    """The listener's connection killed between edits: those committed while it was down
    come by its backfill from the log, each once, in order, and the stream stays open."""
    scratch, _ = chat
    broker = serve()
    client = await subscribe(broker, sessionId="a")
    row = insert(scratch, "a")
    await next_change(client)
    killed = 0
    for n in range(20):
        killed += await asyncio.to_thread(database.terminate_listeners)
        edit = "UPDATE messages SET content = %s WHERE id = %s"
        await asyncio.to_thread(scratch.execute, edit, (f"edit {n}", row))
    assert killed >= 1
    positions = [str(p) for (p,) in scratch.query("SELECT position FROM pgsse.changes")]
    events = await client.events_until(lambda e: e.id == max(positions, key=int), 20)
    assert [e.id for e in events if e.type == "message_updated"] == sorted(positions, key=int)
    assert events[-1].json["data"]["content"] == "edit 19"
    assert {e.type for e in events} <= {"message_updated", "heartbeat"}
