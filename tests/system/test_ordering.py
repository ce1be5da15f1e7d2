"""Ids are drawn before commit, so rows can commit out of id order. These tests pin down
what the broker guarantees then (see the README's "Ordering" section)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg

from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient, subscribe


def open_insert(
    database: Database, session: str, content: str
) -> tuple[psycopg.Connection[object], int]:
    """INSERT in a transaction left open: the row has its id but is not committed."""
    conn = psycopg.connect(database.url)
    row = conn.execute(
        "INSERT INTO messages (session_id, content) VALUES (%s, %s) RETURNING id",
        (session, content),
    ).fetchone()
    assert row is not None
    return conn, int(row[0])


async def message_ids_until(client: SSEClient, last: int) -> list[int]:
    events = await client.events_until(lambda e: e.id == str(last))
    return [int(e.id) for e in events if e.id is not None]


async def test_out_of_order_commits_are_delivered_in_commit_order_and_resume_exactly(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    live = await subscribe(broker, sessionId=session_id)
    early, early_id = open_insert(database, session_id, "drew its id first")
    late_id = database.insert(session_id, "committed first")
    assert early_id < late_id
    assert await message_ids_until(live, late_id) == [late_id]

    dropped = await subscribe(broker, sessionId=session_id)  # leaves right after late_id
    await dropped.close()
    early.commit()
    early.close()
    assert await message_ids_until(live, early_id) == [early_id]

    # Resuming from the late row (the client's last) brings the early one, once.
    resumed = await SSEClient.open(
        broker.port, params={"sessionId": session_id}, headers={"Last-Event-ID": str(late_id)}
    )
    after = database.insert(session_id, "after")
    assert await message_ids_until(resumed, after) == [early_id, after]
    # Resuming from the early row (last in commit order) does not repeat the late one.
    again = await SSEClient.open(
        broker.port, params={"sessionId": session_id}, headers={"Last-Event-ID": str(early_id)}
    )
    assert await message_ids_until(again, after) == [after]


async def test_the_documented_window_resume_on_a_broker_that_never_saw_the_id(
    start_broker: Callable[..., BrokerProcess], database: Database, session_id: str
) -> None:
    """The one case that can lose a row: the resume id is unknown to the broker's journal
    (the broker started after it, or it is older than the journal) and a row with a smaller
    id committed after it. Replay by id cannot know that row is missing."""
    early, early_id = open_insert(database, session_id, "drew its id first")
    late_id = database.insert(session_id, "committed first")
    early.commit()
    early.close()
    fresh = start_broker()  # its journal holds neither row
    resumed = await SSEClient.open(
        fresh.port, params={"sessionId": session_id}, headers={"Last-Event-ID": str(late_id)}
    )
    after = database.insert(session_id, "after")
    received = await message_ids_until(resumed, after)
    assert early_id < late_id and early_id not in received  # the documented loss
    assert received == [after]


async def test_row_committed_while_the_listener_is_down_with_a_smaller_id_is_delivered(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    client = await subscribe(broker, sessionId=session_id)
    early, early_id = open_insert(database, session_id, "open across the outage")
    late_id = database.insert(session_id, "committed first")
    assert await message_ids_until(client, late_id) == [late_id]

    async def outage() -> None:
        for _ in range(25):
            await asyncio.to_thread(database.terminate_listeners)
            await asyncio.sleep(0.02)

    killer = asyncio.ensure_future(outage())
    await asyncio.sleep(0.25)
    early.commit()  # lands in the middle of the outage, below the last id delivered
    early.close()
    await killer
    marker = database.insert(session_id, "marker")
    assert await message_ids_until(client, marker) == [early_id, marker]
