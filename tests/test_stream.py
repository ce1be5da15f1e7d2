"""broker.web.stream: in process, an `EventStreamResponse` on the broker's protocol with a real hub
and socket; end to end, rows inserted into PostgreSQL reach real SSE clients of a real broker.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.events import Message
from broker.flusher import Flusher
from broker.hub import Hub
from broker.server.sink import SINK_EXTENSION
from broker.subscriber import Subscriber
from broker.web.stream import EventStreamResponse
from tests.conftest import Database
from tests.support.processes import BrokerProcess
from tests.support.served import protocol_server
from tests.support.sse import SSEClient

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@dataclass
class StreamApp:
    """Every request is a stream of session "a" on `hub`; `ended` is set as one ends."""

    hub: Hub = field(default_factory=lambda: Hub(max_subscribers=10, queue_size=10))
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    foreign: bool = False  # as under a server without our sink

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.foreign:
            scope["extensions"].pop(SINK_EXTENSION)
        subscriber = self.hub.subscribe("a", None)
        response = EventStreamResponse(
            self.hub, subscriber, None, listening=self.listening, retry_ms=3000
        )
        try:
            await response(scope, receive, send)
        finally:
            self.ended.set()


@dataclass
class InProcess:
    app: StreamApp
    port: int

    async def open(self) -> SSEClient:
        client = await SSEClient.open(self.port, path="/")
        assert client.status == 200 and client.headers["content-type"].startswith("text/event")
        return client

    async def connected(self) -> tuple[SSEClient, Subscriber]:
        """A stream read up to `connected`, the listener being up, and its subscriber."""
        self.app.listening.set()
        client = await self.open()
        await client.events_until(lambda e: e.type == "connected")
        (subscriber,) = self.app.hub.subscribers()
        return client, subscriber


@pytest.fixture
async def in_process() -> AsyncIterator[InProcess]:
    app = StreamApp()
    app.hub.on_idle_ready = Flusher(
        asyncio.get_running_loop(), app.hub.counters.delivery_latency
    ).mark
    async with protocol_server(app) as (port, _state):
        yield InProcess(app, port)


def row(id_: int) -> Message:
    return Message(id_, "a", None, f"m{id_}", False, True, None, "2026-01-01T00:00:00.000Z")


async def test_in_process_nothing_is_written_before_the_first_listen(in_process: InProcess) -> None:
    client = await in_process.open()
    with pytest.raises(TimeoutError):
        await client.event(timeout=0.3)
    in_process.app.listening.set()
    connected = await client.event()
    assert connected.retry == 3000 and connected.type == "connected"


async def test_in_process_an_idle_stream_is_written_through_its_sink(
    in_process: InProcess,
) -> None:
    client, subscriber = await in_process.connected()
    in_process.app.hub.publish(row(1))
    in_process.app.hub.publish(row(2))
    in_process.app.hub.heartbeat()
    events = await client.events_until(lambda e: e.type == "heartbeat")
    assert [e.id for e in events] == ["1", "2", None]
    assert subscriber.direct_sent == 3  # none woke the stream's task
    assert in_process.app.hub.counters.delivery_latency.count == 2


async def test_in_process_a_closed_subscriber_sends_its_reason_and_ends(
    in_process: InProcess,
) -> None:
    client, subscriber = await in_process.connected()
    subscriber.close("going away: reconnect")
    error = await client.event()
    assert error.json == {"type": "error", "error": "going away: reconnect"}
    with pytest.raises(EOFError):
        await client.event()
    await asyncio.wait_for(in_process.app.ended.wait(), 2)
    assert len(in_process.app.hub) == 0


async def test_in_process_a_client_that_goes_is_unsubscribed(in_process: InProcess) -> None:
    before = len(asyncio.all_tasks())
    client, subscriber = await in_process.connected()
    # The connection tells the stream its client went: no second task per stream waits for it.
    assert len(asyncio.all_tasks()) == before + 1
    assert subscriber.on_close is None  # an idle stream holds no cancel scope either
    await client.close()
    await asyncio.wait_for(in_process.app.ended.wait(), 2)
    assert len(in_process.app.hub) == 0
    assert subscriber.closed and subscriber.close_reason is None


async def test_in_process_under_another_server_a_task_hears_the_client_go(
    in_process: InProcess,
) -> None:
    in_process.app.foreign = True
    before = len(asyncio.all_tasks())
    client, subscriber = await in_process.connected()
    assert len(asyncio.all_tasks()) == before + 2  # the request's, and the watcher
    await client.close()
    await asyncio.wait_for(in_process.app.ended.wait(), 2)
    assert len(in_process.app.hub) == 0 and subscriber.closed
    assert len(asyncio.all_tasks()) == before


async def subscribe(broker: BrokerProcess, **params: str) -> SSEClient:
    """Open a stream and read up to its `connected` event."""
    client = await SSEClient.open(broker.port, params=params)
    assert client.status == 200
    connected = await client.event()
    assert connected.type == "connected" and connected.retry == 3000
    return client


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


async def test_an_error_opening_the_stream_releases_its_subscription() -> None:
    # An exp past the float range (before `MAX_TOKEN_SECONDS`) raised before the stream's
    # `try`: a 500 and a subscription counted for good. Whatever raises now, it is released.
    hub = Hub(max_subscribers=10, queue_size=10)
    subscriber = hub.subscribe("a", None)
    response = EventStreamResponse(
        hub, subscriber, None, listening=asyncio.Event(), retry_ms=3000, valid_until=10**400
    )

    async def never(*_: Any) -> Any:
        raise AssertionError("nothing is received or sent")

    with pytest.raises(OverflowError):
        await response({"type": "http", "extensions": {}}, never, never)
    assert len(hub) == 0 and hub.channels() == {} and subscriber.closed
