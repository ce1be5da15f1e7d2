"""The bus under attack and faults (found by a security review), over real processes: a
password-protected Redis, rows of a MiB, a follower stopped while the stream is trimmed past
it, a stopped relay, two Redis servers on one database.

The bus in normal operation: test_bus.py.
"""

from __future__ import annotations

import asyncio
import signal
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis as redis_client
from psycopg import sql

from broker.feeds.relay import LOCK_CLASS, lock_name
from broker.signing import SIGNATURE_CHARS
from tests.support.database import Database
from tests.support.nginx import ClusterScript, require_nginx
from tests.support.processes import BrokerProcess, consecutive_free_ports, free_port, http_json
from tests.support.redis import RedisServer, available, bus_identity, bus_role
from tests.support.sse import SSEClient, connected


@pytest.fixture
def second_redis() -> Iterator[RedisServer]:
    if not available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer().start()
    yield server
    server.destroy()


@pytest.fixture
def password_redis() -> Iterator[RedisServer]:
    if not available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(password=f"pw-{uuid.uuid4().hex}").start()
    yield server
    server.destroy()


def peak_rss_mib(broker: BrokerProcess) -> float:
    """The process's peak resident memory (VmHWM), MiB."""
    assert broker.process is not None
    for line in Path(f"/proc/{broker.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def newest_row(check: redis_client.Redis, stream: str) -> int | None:
    """The row id of the stream's newest entry."""
    newest = check.xrevrange(stream, count=1)
    # An entry's row is its payload after the signature (broker.signing).
    return int(orjson.loads(newest[0][1][b"row"][SIGNATURE_CHARS:])["id"]) if newest else None


async def delivers_and_refuses(
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
    urls: tuple[str, str],
    password: str,
) -> None:
    """A broker on the first URL delivers a row; one on the second stays up and not ready
    (503) for 3 s; `password` is in neither's log."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    good = start_broker(BROKER_BUS_URL=urls[0], BROKER_BUS_STREAM=stream)
    client = await connected(await SSEClient.open(good.port, params={"sessionId": session_id}))
    row = database.insert(session_id, "on a protected bus")
    assert (await client.message(timeout=10)).json["data"]["id"] == str(row)
    await client.close()
    refused = start_broker(wait_ready=False, BROKER_BUS_URL=urls[1], BROKER_BUS_STREAM=stream)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert not refused.ready()  # raises if the process ended
        await asyncio.sleep(0.2)
    for broker in (good, refused):
        assert password not in broker.log_path.read_text(errors="replace")


async def test_a_password_protected_redis_delivers_with_the_password_only(
    start_broker: Callable[..., BrokerProcess],
    password_redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """With the password in BROKER_BUS_URL a broker delivers; without it, another reports the
    bus down (503) and keeps running; the password is in no log."""
    assert password_redis.password is not None
    await delivers_and_refuses(
        start_broker,
        database,
        session_id,
        (password_redis.url, password_redis.open_url),
        password_redis.password,
    )


async def test_a_tls_redis_delivers_with_its_ca_and_refuses_without(
    start_broker: Callable[..., BrokerProcess], database: Database, session_id: str
) -> None:
    """`rediss://` with the CA in `ssl_ca_certs=`, and a password: delivers. Without the CA
    the certificate is not trusted: the broker stays up and not ready."""
    if not available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(password=f"pw-{uuid.uuid4().hex}").use_tls().start()
    try:
        assert server.password is not None
        trusted = f"{server.url}?ssl_ca_certs={server.tls_ca}"
        await delivers_and_refuses(
            start_broker, database, session_id, (trusted, server.url), server.password
        )
    finally:
        server.destroy()


async def test_a_starting_broker_reads_a_stream_of_large_rows_in_bounded_memory(
    start_broker: Callable[..., BrokerProcess],
    second_redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """300 rows of 1 MiB on the bus: a broker that starts, then becomes the relay, reads them
    in pages (it peaked at 801 MiB reading them in one reply)."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    env = {
        "BROKER_BUS_URL": second_redis.url,
        "BROKER_BUS_STREAM": stream,
        "BROKER_BUS_MAX_BYTES": str(512 * 1024 * 1024),  # keep all 300
    }
    first = start_broker(**env)
    database.query(
        "INSERT INTO messages (session_id, content)"
        " SELECT %s, repeat('x', 1048576) FROM generate_series(1, 300) RETURNING id",
        (session_id,),
    )
    check = redis_client.Redis.from_url(second_redis.url)
    try:
        first.wait_until(lambda: check.xlen(stream) >= 300, 120, "300 rows on the bus")
    finally:
        check.close()
    second = start_broker(**env)
    assert bus_role(second) == "follower"
    started = peak_rss_mib(second)
    first.stop()
    second.wait_until(
        lambda: bus_role(second) == "relay" and second.stats()["bus"]["lastId"] is not None,
        30,
        "the second broker relaying",
    )
    relaying = peak_rss_mib(second)
    print(f"\npeak RSS: {started:.0f} MiB after start, {relaying:.0f} MiB as the new relay")
    assert started < 250 and relaying < 250


async def test_a_follower_stopped_while_the_stream_is_trimmed_past_it_loses_no_row(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """SIGSTOP a follower, append far more than the stream keeps, SIGCONT: its stream ends
    with an `error` event, and the client resuming with its last id gets every row once."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    budget = 20_000  # bytes: about 15 rows of 1 KiB
    env = {
        "BROKER_BUS_URL": redis.url,
        "BROKER_BUS_STREAM": stream,
        "BROKER_BUS_MAX_BYTES": str(budget),
    }
    brokers = [start_broker(**env) for _ in range(2)]
    brokers[0].wait_until(
        lambda: sorted(map(bus_role, brokers)) == ["follower", "relay"], 20, "roles"
    )
    follower = next(b for b in brokers if bus_role(b) == "follower")
    client = await connected(await SSEClient.open(follower.port, params={"sessionId": session_id}))
    before = database.insert(session_id, "before")
    assert (await client.message(timeout=10)).json["data"]["id"] == str(before)
    follower.signal(signal.SIGSTOP)
    try:
        rows = [
            int(row[0])
            for row in database.query(
                "INSERT INTO messages (session_id, content)"
                " SELECT %s, repeat('y', 1000) FROM generate_series(1, 200) RETURNING id",
                (session_id,),
            )
        ]
        check = redis_client.Redis.from_url(redis.url)
        try:
            deadline = time.monotonic() + 20
            while newest_row(check, stream) != rows[-1]:
                assert time.monotonic() < deadline, "the last row never reached the bus"
                await asyncio.sleep(0.05)
            entries = check.xrange(stream)
            held = sum(len(fields[b"row"]) for _, fields in entries)
            assert held <= budget and len(entries) < len(rows)  # trimmed, by bytes
        finally:
            check.close()
    finally:
        follower.signal(signal.SIGCONT)
    got = await client.events_until(lambda e: e.type == "error", timeout=15)
    live = [int(e.json["data"]["id"]) for e in got if e.type == "message"]
    resumed = await connected(
        await SSEClient.open(
            follower.port,
            params={"sessionId": session_id},
            headers={"Last-Event-ID": str(live[-1] if live else before)},
        )
    )
    more = await resumed.events_until(lambda e: e.id == str(rows[-1]), timeout=15)
    await resumed.close()
    ids = live + [int(e.json["data"]["id"]) for e in more if e.type == "message"]
    print(f"\n{len(rows)} rows while stopped; {len(live)} live before the error; lost 0")
    assert sorted(ids) == rows and len(ids) == len(set(ids))  # every row, none twice
    assert "bus_gap" in {e["event"] for e in follower.log_events()}
    assert follower.stats()["bus"]["gaps"] >= 1


async def test_a_stopped_relay_is_noticed_within_5s_and_replaced(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """SIGSTOP the relay: within 5 s the others' /readyz is 503; one of them terminates the
    frozen relay's backend, takes over and delivers what was committed meanwhile; SIGCONT: the
    old relay steps down and is ready again as a follower."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [start_broker(BROKER_BUS_URL=redis.url, BROKER_BUS_STREAM=stream) for _ in range(3)]
    brokers[0].wait_until(
        lambda: sorted(map(bus_role, brokers)) == ["follower", "follower", "relay"], 20, "roles"
    )
    relay = next(b for b in brokers if bus_role(b) == "relay")
    others = [b for b in brokers if b is not relay]
    client = await connected(await SSEClient.open(others[0].port, params={"sessionId": session_id}))
    relay.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        during = database.insert(session_id, "while the relay is stopped")
        for broker in others:
            broker.wait_until(lambda b=broker: b.get("/readyz")[0] == 503, 8, "readyz 503")
        noticed = time.monotonic() - stopped
        others[0].wait_until(lambda: "relay" in map(bus_role, others), 20, "a takeover")
        took_over = time.monotonic() - stopped
        assert (await client.message(timeout=15)).json["data"]["id"] == str(during)
        after = database.insert(session_id, "after the takeover")
        assert (await client.message(timeout=10)).json["data"]["id"] == str(after)
    finally:
        relay.signal(signal.SIGCONT)
    await client.close()
    relay.wait_until(lambda: bus_role(relay) == "follower" and relay.ready(), 20, "old relay back")
    for broker in others:
        broker.wait_until(broker.ready, 10, "ready")
    print(f"\nstopped relay noticed after {noticed:.2f} s, replaced after {took_over:.2f} s")
    assert noticed < 5
    events = {e["event"] for b in others for e in b.log_events()}
    assert "relay_stale_terminated" in events
    assert sum(b.stats()["bus"]["takeovers"] for b in others) >= 1
    assert all(b.stats()["bus"]["leaseLive"] for b in brokers)


async def test_two_redis_servers_on_one_database_each_elect_a_relay(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    second_redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """Same stream key, same database, different Redis servers: two buses, two relays (the
    lock's key is the bus's identity), and each delivers."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [
        start_broker(BROKER_BUS_URL=server.url, BROKER_BUS_STREAM=stream)
        for server in (redis, second_redis)
    ]
    for broker in brokers:
        broker.wait_until(lambda b=broker: bus_role(b) == "relay", 15, "its own relay")
    clients = [
        await connected(await SSEClient.open(b.port, params={"sessionId": session_id}))
        for b in brokers
    ]
    row = database.insert(session_id, "on both buses")
    for client in clients:
        assert (await client.message(timeout=10)).json["data"]["id"] == str(row)
        await client.close()
    assert database.listening_backends() == 2


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_clusters_redis_wants_a_password_and_its_files_are_private(
    database: Database, session_id: str
) -> None:
    """`make cluster`: Redis refuses a client without the password; its directory is 700, its
    files (password, configuration, append-only file) 600; the pool delivers."""
    require_nginx()
    if not available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    public, redis_port, first = free_port(), free_port(), consecutive_free_ports(1)
    env = {"DATABASE_URL": database.url, "PGSSE_REDIS_PORT": str(redis_port)}
    cluster = ClusterScript(env, 1, public, first).start()
    try:
        client = redis_client.Redis(port=redis_port)
        with pytest.raises(redis_client.AuthenticationError):
            client.ping()
        client.close()
        directory = cluster.run_dir / "redis"
        password = (directory / "password").read_text().strip()
        assert len(password) >= 32
        assert mode(directory) == 0o700
        for path in directory.rglob("*"):
            assert mode(path) == (0o700 if path.is_dir() else 0o600), path
        assert any(directory.rglob("*.aof")), "no append-only file"
        sse = await SSEClient.open(public, params={"sessionId": session_id})
        await sse.events_until(lambda event: event.type == "connected")
        row = database.insert(session_id, "through the private bus")
        assert (await sse.message(timeout=10)).json["data"]["id"] == str(row)
        await sse.close()
        status, _ = http_json(f"http://127.0.0.1:{first}/readyz")
        assert status == 200
        log = (cluster.run_dir / f"broker-{first}.log").read_text(errors="replace")
        assert password not in log and password not in cluster.output()
        assert mode(cluster.run_dir / f"broker-{first}.log") == 0o600
    finally:
        cluster.stop()
        cluster.remove()


async def test_a_stale_relay_of_another_role_is_reported_not_terminated(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
) -> None:
    """The relay lock held by a session of another role (here a superuser's) with no lease:
    a broker whose role may not end it reports not ready and `takeover_refused` once, keeps
    running, and takes the role once the lock is free."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    role_name = f"pgsse_{uuid.uuid4().hex[:8]}"
    with database.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role_name)))
        # What a broker's role needs: its rows, and the key that signs them.
        conn.execute(
            sql.SQL("GRANT SELECT ON messages, pgsse_key TO {}").format(sql.Identifier(role_name))
        )
    url = database.url.replace("postgres@", f"{role_name}@", 1)
    name = lock_name(stream, await bus_identity(redis, stream))
    with database.connect() as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_CLASS, name))
        broker = start_broker(
            wait_ready=False, DATABASE_URL=url, BROKER_BUS_URL=redis.url, BROKER_BUS_STREAM=stream
        )
        broker.wait_until(
            lambda: "takeover_refused" in {e["event"] for e in broker.log_events()},
            15,
            "takeover_refused",
        )
        await asyncio.sleep(2.5)  # more polls: still refused, logged once, not ready
        assert not broker.ready()
        events = [e["event"] for e in broker.log_events()]
        assert events.count("takeover_refused") == 1
    broker.wait_until(lambda: bus_role(broker) == "relay" and broker.ready(), 15, "the role")
