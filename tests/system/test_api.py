"""The HTTP API around the stream: stats, the connection cap, publishing, bad input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient, subscribe


async def request(
    broker: BrokerProcess,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request; (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{broker.port}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    parsed = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), parsed, payload


def post_json(broker: BrokerProcess, body: object) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode()
    return asyncio.run(
        request(broker, "POST", "/api/messages", data, {"Content-Type": "application/json"})
    )


async def test_stats_counts_streams_per_logical_channel(
    broker: BrokerProcess, session_id: str
) -> None:
    other = session_id + "-b"
    clients = [
        await subscribe(broker, sessionId=session_id),
        await subscribe(broker, sessionId=session_id, robotId="r1"),
        await subscribe(broker, sessionId=other),
        await subscribe(broker),
        await subscribe(broker, robotId="r1"),
    ]
    stats = broker.stats()
    assert stats["totalConnections"] == 5
    assert stats["channels"] == {
        f"session_messages:{session_id}": 2,
        f"session_messages:{other}": 1,
        "session_messages:global": 2,
    }
    for client in clients:
        await client.close()
    broker.wait_until(lambda: broker.stats()["totalConnections"] == 0, 1.0, "stats at zero")
    assert broker.stats()["channels"] == {}


async def test_closed_streams_leave_no_task_behind(broker: BrokerProcess, session_id: str) -> None:
    baseline = broker.stats()["tasks"]
    clients = [await subscribe(broker, sessionId=f"{session_id}-{n}") for n in range(20)]
    assert broker.stats()["tasks"] >= baseline + 20
    for client in clients:
        await client.close()
    broker.wait_until(lambda: broker.stats()["tasks"] <= baseline, 2.0, "tasks back to baseline")


CLIENT_SCRIPT = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
request = "GET /api/sse/messages?sessionId=%s HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"
s.sendall((request % sys.argv[2]).encode())
s.recv(1)
print("connected", flush=True)
time.sleep(60)
"""


async def test_stats_return_to_zero_when_client_process_is_killed(
    broker: BrokerProcess, session_id: str
) -> None:
    clients = [
        subprocess.Popen(  # noqa: ASYNC220 - starting a process does not block for long
            [sys.executable, "-c", CLIENT_SCRIPT, str(broker.port), session_id],
            stdout=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for client in clients:
        assert client.stdout is not None
        assert client.stdout.readline() == b"connected\n"
    assert broker.stats()["channels"] == {f"session_messages:{session_id}": 3}
    for client in clients:
        os.kill(client.pid, signal.SIGKILL)
        client.wait(5)
        assert client.stdout is not None
        client.stdout.close()
    broker.wait_until(lambda: broker.stats()["totalConnections"] == 0, 1.0, "stats at zero")


async def test_connection_cap_answers_503_and_frees_slots(
    start_broker: Callable[..., BrokerProcess], session_id: str
) -> None:
    broker = start_broker(BROKER_MAX_CONNECTIONS="3")
    clients = [await subscribe(broker, sessionId=session_id) for _ in range(3)]
    refused = await SSEClient.open(broker.port, params={"sessionId": session_id})
    assert refused.status == 503
    assert int(refused.headers["retry-after"]) >= 1
    body = json.loads(await refused.body())
    assert body["success"] is False and "too many" in body["error"]
    await refused.close()
    await clients.pop().close()
    broker.wait_until(lambda: broker.stats()["totalConnections"] == 2, 2.0, "slot freed")
    again = await subscribe(broker, sessionId=session_id)
    assert broker.stats()["totalConnections"] == 3
    for client in [*clients, again]:
        await client.close()


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"sessionId": ""}, "sessionId must not be empty"),
        ({"sessionId": "x" * 256}, "at most 255"),
        ({"sessionId": "a\x00b"}, "control"),
        ({"sessionId": "a\nb"}, "control"),
        ({"sessionId": "a\x7fb"}, "control"),
        ({"sessionId": "a\x85b"}, "control"),
        ({"robotId": ""}, "robotId must not be empty"),
        ({"sessionId": "ok", "robotId": "r\tx"}, "control"),
    ],
)
async def test_bad_stream_parameters_are_400(
    broker: BrokerProcess, params: dict[str, str], fragment: str
) -> None:
    client = await SSEClient.open(broker.port, params=params)
    assert client.status == 400
    body = json.loads(await client.body())
    await client.close()
    assert body["success"] is False and fragment in body["error"]
    assert broker.stats()["totalConnections"] == 0


async def test_ids_of_255_code_points_are_accepted(broker: BrokerProcess) -> None:
    client = await subscribe(broker, sessionId="中" * 255)
    await client.close()


def count_rows(database: Database, session_id: str) -> int:
    return int(
        database.query("SELECT count(*) FROM messages WHERE session_id = %s", (session_id,))[0][0]
    )


async def test_post_stores_the_row_and_subscribers_see_it(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    client = await subscribe(broker, sessionId=session_id)
    status, _, raw = await request(
        broker,
        "POST",
        "/api/messages",
        json.dumps(
            {
                "sessionId": session_id,
                "content": "hi 你好",
                "robotId": "r9",
                "isFromBot": True,
                "isHuman": False,
                "intent": "greet",
            }
        ).encode(),
        {"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 201
    answer = json.loads(raw)
    assert answer["success"] is True
    stored = answer["data"]
    row = database.query(
        "SELECT session_id, content, robot_id, is_from_bot, is_human, intent"
        " FROM messages WHERE id = %s",
        (int(stored["id"]),),
    )
    assert row == [(session_id, "hi 你好", "r9", True, False, "greet")]
    event = await client.message()
    assert event.id == stored["id"]
    assert event.json["data"] == stored
    await client.close()


BAD_BODIES = [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "JSON object"),
    (b'{"content": "x"}', "application/json", 400, "sessionId is required"),
    (b'{"sessionId": "S"}', "application/json", 400, "content is required"),
    (b'{"sessionId": "S", "content": ""}', "application/json", 400, "content"),
    (b'{"sessionId": "S", "content": 5}', "application/json", 400, "content must be a string"),
    (b'{"sessionId": "", "content": "x"}', "application/json", 400, "sessionId"),
    (b'{"sessionId": "S", "content": "x", "isHuman": "yes"}', "application/json", 400, "isHuman"),
    (b'{"sessionId": "S", "content": "x", "colour": 1}', "application/json", 400, "colour"),
    (b'{"sessionId": "S", "content": "a\\u0000b"}', "application/json", 400, "NUL"),
    (b'{"sessionId": "S", "content": "\\ud800"}', "application/json", 400, "JSON"),
    (b'{"sessionId": "S", "content": "x"}', "text/plain", 415, "Content-Type"),
    (b'{"sessionId": "S", "content": "x"}', "", 415, "Content-Type"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "fragment"), BAD_BODIES)
async def test_bad_post_is_refused_and_writes_nothing(
    broker: BrokerProcess,
    database: Database,
    session_id: str,
    body: bytes,
    content_type: str,
    status: int,
    fragment: str,
) -> None:
    body = body.replace(b'"S"', json.dumps(session_id).encode())
    headers = {"Content-Type": content_type} if content_type else {}
    got, _, raw = await request(broker, "POST", "/api/messages", body, headers)
    assert got == status
    answer = json.loads(raw)
    assert answer["success"] is False and fragment in answer["error"]
    assert count_rows(database, session_id) == 0
    assert broker.get("/healthz")[0] == 200


async def test_oversized_post_is_413_before_the_body_is_read(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(
        b"POST /api/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2000000\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 413 ")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    answer = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
    assert answer["success"] is False and "at most" in answer["error"]
    writer.close()
    assert count_rows(database, session_id) == 0
    assert broker.get("/healthz")[0] == 200


async def test_oversized_chunked_post_is_413(broker: BrokerProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(
        b"POST /api/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 65536
    try:
        for _ in range(40):  # 2.5 MB, more than the limit
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
    except ConnectionResetError:
        pass  # the broker stopped reading once past the limit, as it should
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 413 ")
    writer.close()
    assert broker.get("/healthz")[0] == 200


async def test_health_and_readiness(broker: BrokerProcess) -> None:
    assert broker.get("/healthz") == (200, {"success": True, "data": {"status": "ok"}})
    assert broker.get("/readyz") == (200, {"success": True, "data": {"status": "ready"}})


async def test_unknown_path_and_method_use_the_error_body(broker: BrokerProcess) -> None:
    status, _, raw = await request(broker, "GET", "/nope")
    assert status == 404 and json.loads(raw)["success"] is False
    status, _, raw = await request(broker, "DELETE", "/api/messages")
    assert status == 405 and json.loads(raw)["success"] is False


async def test_cors_allows_configured_origin_only(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker(BROKER_CORS_ORIGINS="http://app.example:3000")
    _, headers, _ = await request(
        broker, "GET", "/healthz", headers={"Origin": "http://app.example:3000"}
    )
    assert headers.get("access-control-allow-origin") == "http://app.example:3000"
    _, headers, _ = await request(
        broker, "GET", "/healthz", headers={"Origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in headers


async def test_one_stream_of_several_sessions_history_resume_and_stats(
    broker: BrokerProcess, database: Database, session_id: str
) -> None:
    """`sessionId` repeated: each session's rows once, in order, no other session's; stats
    count the stream under each session and once in totalConnections; history and resume
    (from the journal and from the table) follow the same filter."""
    a, b, c = (f"{session_id}-{n}" for n in "abc")
    old = [database.insert(s, f"old {s}") for s in (a, "elsewhere", b)]
    params = [("sessionId", a), ("sessionId", b), ("sessionId", c), ("sessionId", a)]
    client = await SSEClient.open(broker.port, params=[*params, ("history", "5")])
    assert client.status == 200
    first = await client.event()
    assert first.json["sessionId"] == a and first.json["sessionIds"] == [a, b, c]
    assert [int(e.id or 0) for e in [await client.message(), await client.message()]] == [
        old[0],
        old[2],
    ]
    stats = broker.stats()
    assert stats["totalConnections"] == 1
    assert {f"session_messages:{s}": 1 for s in (a, b, c)}.items() <= stats["channels"].items()

    live = [database.insert(s, f"live {s}") for s in (c, "elsewhere", a, b)]
    assert [int(e.id or 0) for e in [await client.message() for _ in range(3)]] == [
        live[0],
        live[2],
        live[3],
    ]
    await client.close()

    # Resume from the journal (this broker delivered live[3]) and from the table (old[0]).
    missed = [database.insert(s, f"missed {s}") for s in (b, "elsewhere", c)]
    from_table = [old[2], live[0], live[2], live[3], missed[0], missed[2]]
    later: list[int] = []  # the row each resume waits for, which the next one gets too
    for after, expected in ((live[3], [missed[0], missed[2]]), (old[0], from_table)):
        resumed = await SSEClient.open(
            broker.port, params=params, headers={"Last-Event-ID": str(after)}
        )
        later.append(database.insert(a, "live again"))
        done = str(later[-1])
        events = await resumed.events_until(lambda e, done=done: e.id == done)
        assert [int(e.id) for e in events if e.id] == [*expected, *later]
        await resumed.close()


async def test_session_id_repeated_past_its_bound_is_400(broker: BrokerProcess) -> None:
    params = [("sessionId", f"s{n}") for n in range(101)]
    refused = await SSEClient.open(broker.port, params=params)
    assert refused.status == 400
    assert "at most 100 times" in json.loads(await refused.body())["error"]
    await refused.close()
    fine = await SSEClient.open(broker.port, params=params[:100])
    assert fine.status == 200
    assert len((await fine.event()).json["sessionIds"]) == 100
    await fine.close()


async def test_a_refused_origin_is_logged_once_with_the_setting_to_change(
    start_broker: Callable[..., BrokerProcess], session_id: str
) -> None:
    broker = start_broker(BROKER_CORS_ORIGINS="http://allowed.test")
    own = f"http://127.0.0.1:{broker.port}"
    for origin in ("http://localhost:3000", "http://localhost:3000", own, "http://allowed.test"):
        client = await SSEClient.open(
            broker.port, params={"sessionId": session_id}, headers={"Origin": origin}
        )
        assert client.status == 200  # served as before: the browser is what refuses
        await client.close()
    await request(broker, "GET", "/healthz", headers={"Origin": "http://other.test"})
    broker.stop()
    warnings = [e for e in broker.log_events() if e["event"] == "cors_origin_not_allowed"]
    assert [(e["origin"], e["level"]) for e in warnings] == [
        ("http://localhost:3000", "warning"),
        ("http://other.test", "warning"),
    ]
    assert "BROKER_CORS_ORIGINS" in warnings[0]["hint"]
