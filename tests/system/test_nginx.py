"""The pool behind real nginx, configured from deploy/nginx/ as docs/deployment.md says.

Each test starts broker instances and an nginx of its own on free ports. Without nginx these
tests skip, unless CI is set: then they fail, since .ci/run installs nginx.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.database import Database
from tests.support.nginx import DEPLOY, ClusterScript, Nginx, require_nginx
from tests.support.processes import BrokerProcess, consecutive_free_ports, free_port, http_json
from tests.support.redis import available as redis_available
from tests.support.sse import Follower, SSEClient

StartBroker = Callable[..., BrokerProcess]
StartPool = Callable[..., Nginx]


@pytest.fixture
def pool() -> Iterator[StartPool]:
    """Start nginx in front of brokers (or bare ports, where nothing may listen);
    `directives` change lines of the locations file."""
    require_nginx()
    started: list[Nginx] = []

    def start(brokers: list[BrokerProcess | int], **directives: str) -> Nginx:
        ports = [b if isinstance(b, int) else b.port for b in brokers]
        nginx = Nginx.render(ports)
        started.append(nginx)
        for name, value in directives.items():
            nginx.set_directive(name, value)
        return nginx.start()

    yield start
    for nginx in started:
        nginx.stop()
        nginx.remove()


def start_instances(start_broker: StartBroker, *envs: dict[str, str]) -> list[BrokerProcess]:
    """One broker per environment, started together, each ready (listener connected)."""
    brokers = [start_broker(wait_ready=False, **env) for env in envs]
    for broker in brokers:
        broker.wait_until(broker.ready, 30, "broker ready")
    return brokers


async def open_stream(port: int, headers: dict[str, str] | None = None, **params: str) -> SSEClient:
    """A stream through `port`, read up to its `connected` event; it must not be refused."""
    client = await SSEClient.open(port, params=params, headers=headers)
    if client.status != 200:
        body = await client.body()
        await client.close()
        raise AssertionError(f"stream answered {client.status}: {body!r}")
    await client.events_until(lambda event: event.type == "connected")
    return client


async def test_300_streams_spread_over_three_instances_and_every_row_reaches_its_streams(
    start_broker: StartBroker, pool: StartPool, database: Database, session_id: str
) -> None:
    brokers = start_instances(start_broker, {}, {}, {})
    nginx = pool(brokers)
    sessions = [f"{session_id}-{n}" for n in range(3)]
    params = [{"sessionId": session} for session in sessions for _ in range(90)] + [{}] * 30

    started = time.perf_counter()
    clients = await asyncio.gather(*(open_stream(nginx.port, **p) for p in params))
    opened = time.perf_counter() - started

    counts = [broker.stats()["totalConnections"] for broker in brokers]
    shares = [count / len(clients) for count in counts]
    print(f"\n300 streams through nginx in {opened:.2f}s: per instance {counts}, shares {shares}")
    assert sum(counts) == 300
    assert max(shares) <= 0.40
    assert database.listening_backends() == 3

    rows = [database.insert(session, f"to {session}") for session in sessions]
    session_clients = clients[:270]
    firsts = await asyncio.gather(*(client.message(timeout=15) for client in session_clients))
    for n, event in enumerate(firsts):
        assert event.id == str(rows[n // 90]), f"client {n} of {sessions[n // 90]} got {event.id}"
    for client in clients[270:]:
        events = await client.events_until(lambda event: event.id == str(rows[-1]), timeout=15)
        assert [int(event.id) for event in events if event.id] == rows
    # Exactly those events and no others were queued: 90 per session row, 30 global per row.
    delivered = [broker.stats()["counters"]["eventsDelivered"] for broker in brokers]
    assert sum(delivered) == 3 * 90 + 3 * 30
    await asyncio.gather(*(client.close() for client in clients))


async def test_clients_of_a_killed_instance_resume_through_nginx_exactly_once(
    start_broker: StartBroker, pool: StartPool, database: Database, session_id: str
) -> None:
    brokers = start_instances(start_broker, {}, {}, {})
    nginx = pool(brokers)
    sessions = [f"{session_id}-{n}" for n in range(10)]
    followers = [Follower(nginx.port, session) for session in sessions for _ in range(3)]
    tasks = [asyncio.create_task(follower.run()) for follower in followers]
    await asyncio.wait_for(asyncio.gather(*(f.opened.wait() for f in followers)), 15)
    # Every client has a last id before the kill, as a browser has once a row arrived.
    for session in sessions:
        database.insert(session, "start")
    await asyncio.wait_for(asyncio.gather(*(f.first_row.wait() for f in followers)), 15)

    counts = [broker.stats()["totalConnections"] for broker in brokers]
    victim = brokers[counts.index(max(counts))]
    victim_streams = max(counts)
    assert victim_streams > 0

    writer = database.connect()
    insert = "INSERT INTO messages (session_id, content) VALUES (%s, %s)"
    started = time.perf_counter()
    for n in range(150):
        await asyncio.to_thread(writer.execute, insert, (sessions[n % len(sessions)], f"m{n}"))
        if n == 50:
            victim.signal(signal.SIGKILL)
        await asyncio.sleep(0.005)
    for session in sessions:
        await asyncio.to_thread(writer.execute, insert, (session, "end"))
    writer.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    elapsed = time.perf_counter() - started

    assert victim.wait(5) == -signal.SIGKILL
    for follower in followers:
        expected = [
            row[0]
            for row in database.query(
                "SELECT id FROM messages WHERE session_id = %s ORDER BY id", (follower.session,)
            )
        ]
        assert follower.ids == expected, f"{follower.session}: {len(follower.ids)} ids"
        assert follower.refused == []
    reconnects = sum(follower.connections - 1 for follower in followers)
    print(
        f"\nkill -9 of an instance holding {victim_streams} of 30 streams: {reconnects}"
        f" reconnects through nginx; 160 rows written and all delivered in {elapsed:.2f}s"
    )
    assert reconnects >= victim_streams


async def test_new_streams_spill_over_from_a_full_instance_without_a_503(
    start_broker: StartBroker, pool: StartPool, session_id: str
) -> None:
    full, *others = start_instances(start_broker, {"BROKER_MAX_CONNECTIONS": "4"}, {}, {})
    nginx = pool([full, *others])
    # Opened directly, so nginx counts no connection to `full`: least_conn will try it.
    direct = [await open_stream(full.port, sessionId=session_id) for _ in range(4)]
    probe = await SSEClient.open(full.port, params={"sessionId": session_id})
    assert probe.status == 503
    await probe.close()
    rejected = full.stats()["counters"]["rejectedConnections"]

    clients = await asyncio.gather(
        *(open_stream(nginx.port, sessionId=session_id) for _ in range(30))
    )

    assert full.stats()["totalConnections"] == 4
    assert sum(other.stats()["totalConnections"] for other in others) == 30
    # nginx did meet the full instance, got its 503 and passed the stream on.
    assert full.stats()["counters"]["rejectedConnections"] > rejected
    await asyncio.gather(*(client.close() for client in [*direct, *clients]))


async def test_heartbeats_keep_a_stream_open_past_nginx_read_timeout(
    start_broker: StartBroker, pool: StartPool, database: Database, session_id: str
) -> None:
    broker = start_broker(BROKER_HEARTBEAT_SECONDS="1")
    nginx = pool([broker], proxy_read_timeout="2s")
    client = await open_stream(nginx.port, sessionId=session_id)
    opened = time.monotonic()
    heartbeats = 0
    while time.monotonic() - opened < 5:
        event = await client.event(timeout=3)
        heartbeats += event.type == "heartbeat"
    assert heartbeats >= 4
    row_id = database.insert(session_id, "still open")
    assert (await client.message(timeout=5)).id == str(row_id)
    await client.close()


async def test_without_heartbeats_nginx_ends_an_idle_stream_at_its_read_timeout(
    start_broker: StartBroker, pool: StartPool, session_id: str
) -> None:
    # The control for the test above: the low timeout does end a quiet stream.
    broker = start_broker(BROKER_HEARTBEAT_SECONDS="30")
    nginx = pool([broker], proxy_read_timeout="2s")
    client = await open_stream(nginx.port, sessionId=session_id)
    opened = time.monotonic()
    with pytest.raises(EOFError):
        await client.event(timeout=10)
    assert 1.5 < time.monotonic() - opened < 5
    await client.close()


def raw_request(
    port: int, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed: (status, lower-cased headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        found = {name.lower(): value for name, value in response.getheaders()}
        return response.status, found, response.read()
    finally:
        connection.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


async def test_make_cluster_as_documented(database: Database, session_id: str) -> None:
    """docs/deployment.md, "Try it on one machine", step by step, on free ports."""
    require_nginx()
    public, first = free_port(), consecutive_free_ports(2)
    env = {"DATABASE_URL": database.url, "PGSSE_REDIS_PORT": str(free_port())}
    cluster = ClusterScript(env, 2, public, first).start()
    try:
        assert http_json(f"http://127.0.0.1:{public}/readyz") == (
            200,
            {"success": True, "data": {"status": "ready"}},
        )
        assert database.listening_backends() == (1 if redis_available() else 2)  # on the bus

        # curl -N 'http://127.0.0.1:8080/api/sse/messages?sessionId=demo'
        client = await open_stream(public, sessionId=session_id)
        # curl -X POST http://127.0.0.1:8080/api/messages -H 'Content-Type: ...' -d '...'
        body = f'{{"sessionId": "{session_id}", "content": "hello"}}'.encode()
        json_type = {"Content-Type": "application/json"}
        status, _, answer = await asyncio.to_thread(
            raw_request, public, "POST", "/api/messages", body, **json_type
        )
        assert status == 201, answer
        event = await client.message(timeout=10)
        assert event.json["data"]["content"] == "hello"
        await client.close()

        # Prometheus scrapes instances, not the pool.
        assert (await asyncio.to_thread(raw_request, public, "GET", "/metrics"))[0] == 403
        assert (await asyncio.to_thread(raw_request, first, "GET", "/metrics"))[0] == 200
    finally:
        code = cluster.stop()
        output = cluster.run_report()
        print(output)  # pytest shows it when the test fails
        cluster.remove()
    assert code == 0, output
    assert not any(port_open(port) for port in (public, first, first + 1))
    wait_for(lambda: database.listening_backends() == 0, 10, "listeners gone")


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for the TLS server")
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    argv += ["-subj", "/CN=pgsse.example.com", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return cert, key


MAIN_CONF = """\
pid nginx.pid;
error_log error.log notice;
events {}
http {
    access_log access.log;
    client_body_temp_path temp/client_body;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;
    gzip on;
    gzip_types application/json text/event-stream;
    include conf.d/*.conf;
}
"""


async def test_public_server_speaks_tls_and_http2_and_streams(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    """deploy/nginx/pgsse.conf as installed in conf.d/ of a Debian-like nginx.conf."""
    broker = start_broker()
    nginx = Nginx.render([broker.port])
    try:
        cert, key = self_signed_certificate(nginx.run_dir)
        redirect_port = free_port()
        site = (DEPLOY / "nginx" / "pgsse.conf").read_text()
        site = site.replace("/etc/letsencrypt/live/pgsse.example.com/fullchain.pem", str(cert))
        site = site.replace("/etc/letsencrypt/live/pgsse.example.com/privkey.pem", str(key))
        site = re.sub(r"(?m)^\s*listen \[::\]:\d+[^;]*;\n", "", site)
        site, tls = re.subn(r"(?m)^(\s*)listen 443 ", rf"\1listen 127.0.0.1:{nginx.port} ", site)
        site, plain = re.subn(
            r"(?m)^(\s*)listen 80;", rf"\1listen 127.0.0.1:{redirect_port};", site
        )
        assert (tls, plain) == (1, 1)
        (nginx.run_dir / "conf.d").mkdir()
        (nginx.run_dir / "conf.d" / "pgsse.conf").write_text(site)
        (nginx.run_dir / "nginx.conf").write_text(MAIN_CONF)
        nginx.start()

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2", "http/1.1"])
        _, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", nginx.port, ssl=context), 10
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        writer.close()

        context.set_alpn_protocols(["http/1.1"])
        gzip = {"Accept-Encoding": "gzip"}
        client = await SSEClient.open(
            nginx.port, params={"sessionId": session_id}, headers=gzip, tls=context
        )
        assert client.status == 200
        assert client.headers["content-type"].startswith("text/event-stream")
        # MAIN_CONF compresses event streams, as a careless global gzip_types would: the
        # stream's location turns it off.
        assert "content-encoding" not in client.headers
        once = {**gzip, "Connection": "close"}
        health = await SSEClient.open(nginx.port, "/healthz", headers=once, tls=context)
        assert health.headers.get("content-encoding") == "gzip"  # where it is not turned off
        await health.close()
        await client.events_until(lambda event: event.type == "connected")
        row_id = database.insert(session_id, "over TLS")
        assert (await client.message()).id == str(row_id)
        # Drop the connection, as a closed tab does: an orderly TLS shutdown of a stream
        # still being written waits seconds for the peer's close_notify.
        client.writer.transport.abort()

        status, headers, _ = await asyncio.to_thread(raw_request, redirect_port, "GET", "/x")
        assert status == 301 and headers["location"].startswith("https://")
    finally:
        nginx.stop()
        nginx.remove()


def test_admin_paths_with_a_trailing_newline_are_denied_by_nginx(
    start_broker: StartBroker, pool: StartPool
) -> None:
    """`location = /metrics` compared the decoded path, so `/metrics%0A` passed the deny; with
    auth off the broker's router then served stats (every open session id) on the public port."""
    broker = start_broker()
    nginx = pool([broker])
    for path in ("/api/sse/stats", "/metrics", "/api/sse/stats%0A", "/metrics%0A", "/metrics%0d"):
        status, _, body = raw_request(nginx.port, "GET", path)
        assert status == 403, (path, status, body[:200])
        assert b"totalConnections" not in body and b"# TYPE" not in body
    assert raw_request(broker.port, "GET", "/api/sse/stats%0A")[0] == 400  # and the broker


async def test_no_token_reaches_any_nginx_log_while_instances_are_down(
    start_broker: StartBroker, pool: StartPool, session_id: str
) -> None:
    """nginx writes the request line into every error about a request: an instance down put
    the stream's ?token= into error.log. The access log says what happened instead."""
    broker = start_broker()
    nginx = pool([free_port(), broker.port])  # the first is down: each request may meet it
    tokens = [f"tok{n}-{random.getrandbits(64):016x}" for n in range(3)]
    for _ in range(3):  # the broker refuses nothing here (auth is off): streams open
        client = await SSEClient.open(
            nginx.port, params={"sessionId": session_id, "token": tokens[0]}
        )
        await client.close()
        raw_request(nginx.port, "GET", f"/?sessionId={session_id}&token={tokens[1]}")
        raw_request(nginx.port, "POST", f"/api/messages?token={tokens[2]}", b"{}")
    broker.stop()  # now every instance is down: 502s, each an error about a request
    for _ in range(3):
        assert raw_request(nginx.port, "GET", f"/?token={tokens[1]}")[0] == 502
        client = await SSEClient.open(nginx.port, params={"sessionId": "x", "token": tokens[0]})
        assert client.status == 502
        await client.close()
    nginx.stop()
    logs = {path: path.read_bytes() for path in nginx.run_dir.rglob("*") if path.is_file()}
    for path, text in logs.items():
        for token in tokens:
            assert token.encode() not in text, f"{token} in {path.name}"
    access = logs[nginx.run_dir / "access.log"].decode()
    assert "upstream_status=502" in access  # the failures are on record, without the query


def test_publishing_through_nginx_is_rate_limited_with_a_json_429(
    start_broker: StartBroker, pool: StartPool
) -> None:
    broker = start_broker()
    nginx = pool([broker])
    connection = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=10)
    statuses: list[int] = []
    try:
        for _ in range(400):  # no Content-Type: the broker's quick 415 where nginx lets it by
            connection.request("POST", "/api/messages", body=b"{}")
            response = connection.getresponse()
            body = response.read()
            statuses.append(response.status)
            if response.status == 429:
                assert json.loads(body)["success"] is False
                assert response.getheader("retry-after") == "1"
                assert response.getheader("content-type") == "application/json"
    finally:
        connection.close()
    print(f"\n400 quick POSTs: {statuses.count(429)} answered 429 by nginx")
    assert statuses.count(415) >= 100 and statuses.count(429) > 0
    assert set(statuses) == {415, 429}
