"""Defects at the edges (found by a security review), each over a real broker process and real
sockets: paths with control characters, requests pipelined behind a stream in one write, and
the hardening of every answer. nginx's side of them is in test_nginx."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable

from broker.feeds.listener import CHANNEL
from broker.web.limits import SharedStreamCounter
from broker.workers import STARTUP_SECONDS
from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.security import RawClient

StartBroker = Callable[..., BrokerProcess]


def answer_to(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with RawClient(port) as client:
        client.send(request)
        got = client.answer()
        return got.status, got.headers, got.body


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_admin_paths_with_a_control_character_are_400_before_routing(
    start_broker: StartBroker,
) -> None:
    """With auth off the admin routes are public; `/api/sse/stats%0A` reached them (the route
    regex's `$` matches before a trailing newline), so a proxy's exact-path deny was passed."""
    broker = start_broker()
    for path in ("/api/sse/stats%0A", "/metrics%0A", "/healthz%0a", "/api/sse/st%09ats", "/%7F"):
        status, headers, body = answer_to(broker.port, get(path))
        assert status == 400, (path, status, body[:200])
        assert json.loads(body) == {
            "success": False,
            "error": "control characters in the request path",
        }
        assert headers["content-type"] == "application/json"
    assert answer_to(broker.port, get("/api/sse/stats"))[0] == 200  # the real one still is


def test_requests_pipelined_behind_a_stream_in_one_write_are_bounded(
    start_broker: StartBroker,
) -> None:
    """100 connections, each a stream request plus 60 KB of `GET /healthz` in one write: each
    is cut, and the broker's memory grows by little (it grew by 148 MiB, none cut)."""
    broker = start_broker()
    pipelined = get("/healthz") * (60_000 // len(get("/healthz")))
    stream = get("/api/sse/messages?sessionId=pipelined")
    before = broker.rss_kib()
    clients = [RawClient(broker.port, timeout=10) for _ in range(100)]
    try:
        for client in clients:
            client.send(stream + pipelined)
        for client in clients:
            client.closed_within(10)  # TimeoutError if the connection stays open
        grown = broker.rss_kib() - before
    finally:
        for client in clients:
            client.close()
    print(f"\nRSS grew by {grown} KiB for 100 connections")
    assert grown < 20 * 1024
    broker.wait_until(lambda: broker.stats()["totalConnections"] == 0, 5, "streams released")
    broker.wait_until(lambda: logged(broker, "pipeline_overflow")[0] == 100, 5, "the count")
    assert logged(broker, "pipeline_overflow")[1] <= 6  # two a second at most


def logged(broker: BrokerProcess, event: str) -> tuple[int, int]:
    """How many times `event` happened by its log lines' counts, and in how many lines."""
    lines = [line for line in broker.log_events() if line.get("event") == event]
    return sum(line.get("count", 1) for line in lines), len(lines)


def test_every_answer_says_nosniff_and_the_demo_page_may_not_be_framed(
    start_broker: StartBroker,
) -> None:
    broker = start_broker(BROKER_MAX_HEADER_BYTES="1024")
    requests = {
        "json": get("/healthz"),
        "404": get("/nothing"),
        "page": get("/"),
        "static": get("/static/sse-client.js"),
        "types": get("/static/sse-client.d.ts"),
        "stream-refused": get("/api/sse/messages?sessionId=global"),
        "431": get("/healthz", "X-Big: " + "b" * 2000),
        "unparsable": b"GET /healthz HTTP/1.1\rHost: x\r\n\r\n",
    }
    seen: dict[str, tuple[int, dict[str, str], bytes]] = {}
    for name, request in requests.items():
        seen[name] = answer_to(broker.port, request)
        assert seen[name][1].get("x-content-type-options") == "nosniff", (name, seen[name][:2])
    with RawClient(broker.port) as client:  # a stream's head too
        client.send(get("/api/sse/messages?sessionId=nosniff"))
        head = client.answer()
        assert head.is_stream and head.headers["x-content-type-options"] == "nosniff"
    page = seen["page"][1]
    assert "frame-ancestors 'none'" in page["content-security-policy"]
    assert "default-src 'self'" in page["content-security-policy"]
    assert page["x-frame-options"] == "DENY"
    assert seen["types"][0] == 200
    assert seen["types"][1]["content-type"].startswith("application/typescript")
    for name in ("431", "unparsable", "stream-refused"):
        _, headers, body = seen[name]
        assert headers["content-type"] == "application/json", name
        assert json.loads(body)["success"] is False
    assert seen["unparsable"][0] == 400


def test_a_flood_of_refused_tokens_is_logged_at_a_bounded_rate(
    start_broker: StartBroker,
) -> None:
    """66,000 `auth_refused` lines in 8 s came from one client; now one line per reason and
    interval carries the count."""
    broker = start_broker(BROKER_AUTH_SECRET="s" * 32)
    request = get("/api/sse/messages?sessionId=a&token=not-a-token") * 50
    started = time.monotonic()
    refused = 0
    while refused < 2000:
        with RawClient(broker.port) as client, contextlib.suppress(ConnectionError):
            client.send(request)
            for _ in range(50):
                assert client.answer().status == 401
                refused += 1
    elapsed = time.monotonic() - started
    broker.wait_until(lambda: logged(broker, "auth_refused")[0] >= refused, 5, "the count")
    counted, lines = logged(broker, "auth_refused")
    print(f"\n{refused} refusals in {elapsed:.1f}s: {lines} log lines, counting {counted}")
    assert lines <= 2 * (elapsed + 1)  # at most two per reason per second
    assert counted == refused
    # Requests that do not parse: uvicorn's own warning for each is dropped, ours counts them.
    for _ in range(200):
        with RawClient(broker.port) as client:
            client.send(b"GET /healthz HTTP/1.1\rHost: x\r\n\r\n")
            assert client.answer().status == 400
    broker.wait_until(lambda: logged(broker, "request_invalid")[0] == 200, 5, "the count")
    assert logged(broker, "request_invalid")[1] <= 4
    assert logged(broker, "Invalid HTTP request received.") == (0, 0)  # uvicorn's, per request


def _open_streams(port: int, attempts: int) -> tuple[list[RawClient], list[int]]:
    """`attempts` streams on new connections: the open ones, and every status."""
    held, statuses = [], []
    for _ in range(attempts):
        client = RawClient(port)
        client.send(get("/api/sse/messages?sessionId=capped"))
        status = client.answer().status
        statuses.append(status)
        if status == 200:
            held.append(client)
        else:
            client.close()
    return held, statuses


def test_the_per_client_cap_holds_for_the_port_over_three_workers(
    start_broker: StartBroker,
) -> None:
    """`--workers 3` with a cap of 3 let one address hold 9 streams, 3 per worker."""
    broker = start_broker(BROKER_WORKERS="3", BROKER_MAX_STREAMS_PER_IP="3")
    started = time.monotonic()  # the workers were forked before it was ready
    pids = set(broker.worker_stats(3))
    held, statuses = _open_streams(broker.port, 30)
    try:
        print(f"\n30 attempts over 3 workers: {len(held)} streams held")
        assert len(held) == 3 and statuses.count(429) == 27
        per_worker = {
            pid: stats["totalConnections"] for pid, stats in broker.worker_stats(3).items()
        }
        assert sum(per_worker.values()) == 3, per_worker
        # A worker killed with its streams frees their slots: the one forked in its place
        # clears its column; the others' streams still count.
        victim = next(pid for pid, count in per_worker.items() if count)
        # A worker that dies while starting stops them all instead: wait until that is past.
        time.sleep(max(0.0, STARTUP_SECONDS - (time.monotonic() - started)))
        os.kill(victim, signal.SIGKILL)
        broker.wait_until(lambda: _replaced(broker, victim), 20, "a new worker")
        assert pids - {victim} <= set(broker.worker_stats(3))
        more, statuses = _open_streams(broker.port, 30)
        held += more
        assert len(more) == per_worker[victim] and statuses.count(429) == 30 - len(more)
    finally:
        for client in held:
            client.close()


def _replaced(broker: BrokerProcess, victim: int) -> bool:
    """True once three workers answer and `victim` is not one (it may reset as it dies)."""
    try:
        return victim not in set(broker.worker_stats(3))
    except OSError:
        return False


def test_a_refused_notification_is_logged_by_length_not_content(
    start_broker: StartBroker, database: Database
) -> None:
    """`notification_malformed` logged the payload's first 200 characters: row content, in an
    error log that is kept longer and read by more people than the table. A payload the
    broker does not act on (unsigned, or malformed) is now logged by its length only."""
    broker = start_broker()
    payload = '{"id": "1", "content": "private-' + "x" * 40 + '"'  # cut short: malformed
    database.query("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
    broker.wait_until(lambda: '"notification_refused"' in broker.log(), 10, "the refusal")
    (logged,) = [e for e in broker.log_events() if e["event"] == "notification_refused"]
    assert "private-" not in broker.log_path.read_text()
    assert logged["bytes"] == len(payload)


def _in_worker(counter: SharedStreamCounter, column: int, clients: list[str]) -> list[bool]:
    """`acquire` of each of `clients` in a forked process counting in `column`."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(read)
        counter.use_column(column)
        os.write(write, bytes(counter.acquire(client) for client in clients))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        results = [bool(byte) for byte in pipe.read()]
    assert os.waitpid(pid, 0)[1] == 0
    return results


def test_a_shared_counter_counts_every_worker_and_forgets_a_replaced_one() -> None:
    counter = SharedStreamCounter(limit=2, workers=2, entries=128)
    try:
        counter.use_column(0)
        assert [counter.acquire("a") for _ in range(3)] == [True, True, False]
        assert _in_worker(counter, 1, ["a", "b"]) == [False, True]  # a: 2 held by the other
        assert [counter.acquire("b") for _ in range(2)] == [True, False]  # one here, one there
        counter.release("a")
        assert _in_worker(counter, 1, ["a", "a"]) == [True, False]  # a replacement of worker 1
        assert counter.acquire("b")  # the replaced worker's b was forgotten; a's is new
        assert not counter.acquire("a")
    finally:
        counter.close()
