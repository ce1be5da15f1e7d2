"""`history=N`: the last N matching rows, oldest first, then live; no gap, no duplicate.

History is built on the resume mechanism (`broker/replay.py`): subscribe, read, then let the
hub drop or skip what the read sent. These tests drive it over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Callable

import pytest

from tests.support.database import Database
from tests.support.pgproxy import PostgresProxy
from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient, SSEEvent
from tests.support.writers import concurrent_writer


def message_ids(events: list[SSEEvent]) -> list[int]:
    return [int(e.id) for e in events if e.id is not None and e.type == "message"]


async def open_history(broker: BrokerProcess, **params: str) -> SSEClient:
    client = await SSEClient.open(broker.port, params=params)
    assert client.status == 200
    return client


async def read_until(client: SSEClient, last: int) -> list[int]:
    return message_ids(await client.events_until(lambda e: e.id == str(last)))


async def test_history_sends_the_last_rows_oldest_first_then_live(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    rows = [database.insert(session_id, f"h{n}") for n in range(5)]
    database.insert(session_id + "-other", "not mine")
    client = await open_history(broker, sessionId=session_id, history="3")
    events = await client.events_until(lambda e: e.id == str(rows[-1]))
    assert events[0].type == "connected" and events[0].retry == 3000
    assert message_ids(events) == rows[2:]
    assert [e.json["data"]["content"] for e in events[1:]] == ["h2", "h3", "h4"]
    live = database.insert(session_id, "live")
    assert await read_until(client, live) == [live]


async def test_history_follows_the_robot_filter_and_may_hold_fewer_rows(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    robot = session_id + "-robot"
    mine = [database.insert(f"{session_id}-{n}", "r", robot) for n in range(2)]
    database.insert(session_id, "another robot", robot + "-2")
    client = await open_history(broker, robotId=robot, history="1000")  # the global stream
    assert await read_until(client, mine[-1]) == mine
    live = database.insert(session_id, "live", robot)
    assert await read_until(client, live) == [live]


async def test_history_of_a_session_with_no_rows_is_live_only(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    client = await open_history(broker, sessionId=session_id, history="5")
    live = database.insert(session_id, "live")
    assert await read_until(client, live) == [live]


async def test_history_is_ignored_with_a_last_event_id(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    rows = [database.insert(session_id, f"h{n}") for n in range(5)]
    for headers, params in (
        ({"Last-Event-ID": str(rows[1])}, {}),
        ({}, {"lastEventId": str(rows[1])}),
    ):
        client = await SSEClient.open(
            broker.port,
            params={"sessionId": session_id, "history": "1", **params},
            headers=headers,
        )
        assert await read_until(client, rows[-1]) == rows[2:]  # the resume, not the last row
        await client.close()


@pytest.mark.parametrize("value", ["0", "1001", "abc", "-1", "", "1.5", " 5", "99999"])
async def test_bad_history_is_400_and_opens_nothing(
    broker: BrokerProcess, session_id: str, value: str
) -> None:
    client = await SSEClient.open(broker.port, params={"sessionId": session_id, "history": value})
    assert client.status == 400
    body = json.loads(await client.body())
    await client.close()
    assert body == {"success": False, "error": "history must be a whole number from 1 to 1000"}
    assert broker.stats()["totalConnections"] == 0


async def test_history_while_the_listener_is_down_sends_nothing_twice_or_out_of_order(
    start_broker: Callable[..., BrokerProcess],
    pgproxy: PostgresProxy,
    database: Database,
    session_id: str,
) -> None:
    """History read during an outage of the listener: its backfill later routes every row
    of the outage, those of the history and older ones among them. None reaches the stream:
    history is a resume from just before its oldest row."""
    broker = start_broker(DATABASE_URL=pgproxy.url)
    pgproxy.listener_blocked.set()
    assert await asyncio.to_thread(database.terminate_listeners) == 1
    await asyncio.to_thread(broker.wait_until, lambda: not broker.ready(), 10, "listener down")
    rows = [database.insert(session_id, f"during {n}") for n in range(6)]
    client = await open_history(broker, sessionId=session_id, history="2")
    assert await read_until(client, rows[-1]) == rows[-2:]
    pgproxy.listener_blocked.clear()
    await asyncio.to_thread(broker.wait_until, broker.ready, 10, "listener back")
    live = database.insert(session_id, "live")
    assert await read_until(client, live) == [live]


async def test_history_race_with_a_busy_writer_has_no_gap_and_no_duplicate(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    """60 streams open with `history=N` at random moments while a writer inserts 400 rows/s:
    each receives a contiguous run of the session's rows (its last N at the time, then every
    later one), with nothing missing and nothing twice."""
    inserted: dict[str, list[int]] = {session_id: [database.insert(session_id, "first")]}
    stop = threading.Event()
    writer = threading.Thread(
        target=concurrent_writer, args=(database, [session_id], stop, inserted, 400.0)
    )
    writer.start()
    rng = random.Random(14)

    async def one(count: int, delay: float) -> tuple[int, list[int]]:
        await asyncio.sleep(delay)  # spreads the opens over the writer's run
        committed = len(inserted[session_id])  # at least this many rows precede the read
        client = await open_history(broker, sessionId=session_id, history=str(count))
        got: list[int] = []
        while len(got) < count + 100:
            got.append(int((await client.message(timeout=10)).id or 0))
        await client.close()
        return committed, got

    counts = [rng.randint(1, 300) for _ in range(60)]
    try:
        await asyncio.sleep(0.5)  # let some history build up first
        results = await asyncio.wait_for(
            asyncio.gather(*(one(n, rng.uniform(0, 3)) for n in counts)), 60
        )
    finally:
        stop.set()
        await asyncio.to_thread(writer.join, 10)
    expected = inserted[session_id]
    for count, (committed, got) in zip(counts, results, strict=True):
        start = expected.index(got[0])
        assert got == expected[start : start + len(got)], f"history={count}: gap or duplicate"
        assert start >= committed - count, f"history={count} began too far back"
