"""broker.web.stream end to end: rows inserted into PostgreSQL reach real SSE clients of a real
broker (the response in process: tests/web/test_stream.py)."""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
import time

import pytest

from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient, subscribe

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def test_stream_headers_and_connected_event(broker: BrokerProcess, session_id: str) -> None:
    client = await SSEClient.open(broker.port, params={"sessionId": session_id})
    assert client.status == 200
    assert client.headers["content-type"].startswith("text/event-stream")
    assert client.headers["cache-control"] == "no-cache"
    assert client.headers["x-accel-buffering"] == "no"
    assert "content-length" not in client.headers
    first = await client.event()
    assert first.raw.startswith(b"retry: 3000\ndata: ")  # one block: no empty event
    connected = first.json
    assert connected == {
        "type": "connected",
        "message": "SSE connected",
        "timestamp": connected["timestamp"],
        "sessionId": session_id,
        "robotId": None,
    }
    assert TIMESTAMP.fullmatch(connected["timestamp"])
    await client.close()


async def test_sql_insert_reaches_subscriber_with_contract_fields(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    client = await subscribe(broker, sessionId=session_id)
    latencies = []
    for n in range(200):
        started = time.perf_counter()
        row_id = await asyncio.to_thread(database.insert, session_id, f"m{n}", "r1", intent="greet")
        event = await client.message()
        latencies.append(time.perf_counter() - started)
        assert event.id == str(row_id)
        body = event.json
        assert set(body) == {"type", "data", "timestamp"}
        assert TIMESTAMP.fullmatch(body["timestamp"])
        data = body["data"]
        assert data == {
            "id": str(row_id),
            "sessionId": session_id,
            "robotId": "r1",
            "content": f"m{n}",
            "isFromBot": False,
            "isHuman": True,
            "intent": "greet",
            "createdAt": data["createdAt"],
        }
        assert TIMESTAMP.fullmatch(data["createdAt"])
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"\nround trip INSERT -> SSE over 200 rows: p50 {statistics.median(latencies) * 1e3:.2f}"
        f" ms, p99 {p99 * 1e3:.2f} ms, max {latencies[-1] * 1e3:.2f} ms"
    )
    await client.close()


async def test_null_robot_and_intent_are_null(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    client = await subscribe(broker, sessionId=session_id)
    database.insert(session_id, "x", is_from_bot=True, is_human=False)
    data = (await client.message()).json["data"]
    assert data["robotId"] is None and data["intent"] is None
    assert data["isFromBot"] is True and data["isHuman"] is False
    await client.close()


async def test_sessions_are_isolated_and_robot_narrows(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    other = session_id + "-other"
    session_a = await subscribe(broker, sessionId=session_id)
    session_a_robot = await subscribe(broker, sessionId=session_id, robotId="bot-1")
    everything = await subscribe(broker)
    global_robot = await subscribe(broker, robotId="bot-1")

    rows = [
        database.insert(session_id, "a0", "bot-1"),
        database.insert(other, "b0", "bot-1"),
        database.insert(session_id, "a1", "bot-2"),
        database.insert(other, "b1"),
        database.insert(session_id, "a2"),
    ]
    marker = database.insert(session_id, "end", "bot-1")

    async def ids_until_marker(client: SSEClient) -> list[int]:
        events = await client.events_until(lambda e: e.id == str(marker))
        return [int(e.id) for e in events if e.id is not None and e.id != str(marker)]

    assert await ids_until_marker(session_a) == [rows[0], rows[2], rows[4]]
    assert await ids_until_marker(session_a_robot) == [rows[0]]
    assert await ids_until_marker(global_robot) == [rows[0], rows[1]]
    global_ids = await everything.events_until(lambda e: e.id == str(marker))
    assert [int(e.id) for e in global_ids if e.id][:-1] == rows
    for client in (session_a, session_a_robot, everything, global_robot):
        await client.close()


CONTENTS = [
    "你好，世界",
    "emoji 😀👍🏽 and ZWJ 👩‍👩‍👧",
    "quotes \" and ' and `",
    "back\\slash \\n not a newline",
    "line one\nline two\n\nafter a blank line",
    "carriage\rreturn\r\nand crlf",
    "data: looks like a field\n\nid: 99\nevent: fake\nretry: 1",
    "tab\tand unit separator \x1f and DEL \x7f",
    "x" * 100_000,
    "中" * 40_000,
]


@pytest.mark.parametrize("content", CONTENTS, ids=lambda c: repr(c[:20]))
async def test_content_round_trips_byte_exact(
    broker: BrokerProcess, database: Database, session_id: str, content: str
) -> None:
    client = await subscribe(broker, sessionId=session_id)
    row_id = database.insert(session_id, content)
    event = await client.message()
    assert event.id == str(row_id)
    assert event.json["data"]["content"].encode() == content.encode()
    await client.close()


async def test_large_row_and_long_session_id_take_the_reference_path(
    broker: BrokerProcess, database: Database
) -> None:
    long_session = "s" * 255
    client = await subscribe(broker, sessionId=long_session)
    row_id = database.insert(long_session, "y" * 100_000, "r" * 255)
    data = (await client.message()).json["data"]
    assert data["id"] == str(row_id) and data["content"] == "y" * 100_000
    assert data["robotId"] == "r" * 255
    await client.close()


async def test_heartbeats_arrive_at_the_configured_interval(
    start_broker: object, session_id: str
) -> None:
    broker = start_broker(BROKER_HEARTBEAT_SECONDS="1")  # type: ignore[operator]
    client = await subscribe(broker, sessionId=session_id)
    await client.events_until(lambda e: e.type == "heartbeat", timeout=3)
    arrivals = []
    for _ in range(3):
        event = await client.event(timeout=3)
        assert event.type == "heartbeat"
        assert TIMESTAMP.fullmatch(event.json["timestamp"])
        arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.5 < gap < 1.5 for gap in gaps), gaps
    await client.close()


async def test_one_listening_backend_for_a_thousand_subscribers(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    clients = await asyncio.gather(*(subscribe(broker, sessionId=session_id) for _ in range(1000)))
    assert broker.stats()["totalConnections"] == 1000
    assert database.listening_backends() == 1
    channels = database.query("SELECT pg_listening_channels()")
    assert channels == []  # this connection listens to nothing: the broker's one does
    row_id = database.insert(session_id, "to all")
    events = await asyncio.gather(*(client.message(timeout=20) for client in clients))
    assert {event.id for event in events} == {str(row_id)}
    await asyncio.gather(*(client.close() for client in clients))
    broker.wait_until(lambda: broker.stats()["totalConnections"] == 0, 5, "streams closed")
