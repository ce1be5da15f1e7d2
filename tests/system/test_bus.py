"""The bus end to end: broker processes on real PostgreSQL and real Redis (BROKER_BUS_URL).

In-process tests: tests/feeds/test_bus.py and tests/feeds/test_relay.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from broker.feeds.relay import LOCK_CLASS, lock_name
from tests.support.database import Database, stored_ids
from tests.support.nginx import Nginx
from tests.support.probes import FirstSuccess, postgres_outage
from tests.support.processes import BrokerProcess
from tests.support.redis import RedisServer, bus_identity, bus_role, on_bus, the_relay
from tests.support.sse import SSEClient, connected
from tests.support.writers import Writer

pytestmark = pytest.mark.captures  # every test once per capture mode (tests/conftest.py)


def scrape(broker: BrokerProcess) -> str:
    with urllib.request.urlopen(broker.base_url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


@asynccontextmanager
async def the_role_held_by_the_test(
    database: Database, redis: RedisServer, stream: str, survivor: BrokerProcess
) -> AsyncIterator[None]:
    """The relay's lock taken by the test once the dead relay's session let it go: what
    commits inside commits while no broker holds the role. On exit the lock is let go and
    `survivor` takes the role over."""
    took = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
    name = lock_name(stream, await bus_identity(redis, stream))
    with database.connect() as lock:
        survivor.wait_until(
            lambda: lock.execute(took, (LOCK_CLASS, name)).fetchone() == (True,),
            10,
            "the dead relay's lock, for the test",
        )
        yield
        lock.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (LOCK_CLASS, name))
        survivor.wait_until(lambda: bus_role(survivor) == "relay", 10, "takeover")


async def test_three_brokers_hold_one_listening_backend_and_all_deliver(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [on_bus(start_broker, redis, stream) for _ in range(3)]
    brokers[0].wait_until(
        lambda: sorted(bus_role(b) for b in brokers) == ["follower", "follower", "relay"],
        20,
        "one relay, two followers",
    )
    assert database.listening_backends() == 1
    clients = [await SSEClient.open(b.port, params={"sessionId": session_id}) for b in brokers]
    for client in clients:
        await connected(client)
    row = database.insert(session_id, "on the bus")
    for client in clients:
        event = await client.message(timeout=10)
        assert event.json["data"]["id"] == str(row)
        await client.close()
    for broker in brokers:
        bus = broker.stats()["bus"]
        assert bus["lastId"] is not None and bus["lag"] >= 0
        metrics = scrape(broker)
        relay = 1 if bus["role"] == "relay" else 0
        # Only the relay holds a LISTEN connection, and stats say so.
        assert broker.stats()["listener"]["connected"] is bool(relay)
        assert f"pgsse_bus_relay {relay}.0" in metrics and "pgsse_bus_lag_seconds " in metrics


async def test_resume_on_another_broker_follows_the_shared_order(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """A commits the smaller id after B: a client that got B on one broker resumes with B's id
    on another and receives A exactly once."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    first, second = on_bus(start_broker, redis, stream), on_bus(start_broker, redis, stream)
    client = await SSEClient.open(first.port, params={"sessionId": session_id})
    await connected(client)
    with database.connect() as a, database.connect() as b:
        a.autocommit = b.autocommit = False
        (id_a,) = a.execute(
            "INSERT INTO messages (session_id, content) VALUES (%s, 'A') RETURNING id",
            (session_id,),
        ).fetchone() or (0,)
        (id_b,) = b.execute(
            "INSERT INTO messages (session_id, content) VALUES (%s, 'B') RETURNING id",
            (session_id,),
        ).fetchone() or (0,)
        assert id_a < id_b
        b.commit()
        got = await client.message(timeout=10)
        assert got.json["data"]["id"] == str(id_b)
        await client.close()
        a.commit()
    second.wait_until(lambda: second.stats()["bus"]["lastId"] is not None, 10, "rows read")
    resumed = await SSEClient.open(
        second.port, params={"sessionId": session_id}, headers={"Last-Event-ID": str(id_b)}
    )
    await connected(resumed)
    again = await resumed.message(timeout=10)
    assert again.json["data"]["id"] == str(id_a)
    later = database.insert(session_id, "C")
    assert (await resumed.message(timeout=10)).json["data"]["id"] == str(later)
    await resumed.close()


async def test_redis_down_for_3s_loses_nothing_and_repeats_nothing(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """Readiness is 503 while Redis is down; the stream stays open; after Redis returns every
    row committed meanwhile is delivered, once."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [on_bus(start_broker, redis, stream) for _ in range(2)]
    clients = [
        await connected(await SSEClient.open(b.port, params={"sessionId": session_id}))
        for b in brokers
    ]
    rows = [database.insert(session_id, "before")]
    redis.stop()
    for broker in brokers:
        broker.wait_until(lambda b=broker: b.get("/readyz")[0] == 503, 10, "readyz 503")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        rows.append(database.insert(session_id, "during"))
        await asyncio.sleep(0.1)
    redis.start()
    rows += [database.insert(session_id, "after") for _ in range(3)]
    for client in clients:
        got = await client.events_until(lambda event: event.id == str(rows[-1]), timeout=30)
        ids = [int(event.json["data"]["id"]) for event in got if event.type == "message"]
        assert sorted(ids) == rows  # every row, none twice
        await client.close()
    for broker in brokers:
        broker.wait_until(lambda b=broker: b.get("/readyz")[0] == 200, 10, "ready again")
    # The relay that could not append gave the role up (its backfill then appended the rest).
    events = {e["event"] for b in brokers for e in b.log_events()}
    assert {"relay_append_failed", "relay_lost"} <= events


class Follower:
    """A client as an `EventSource` is one: through nginx, and when its stream ends it
    reconnects with `Last-Event-ID`, until it has read the row `final` names."""

    def __init__(self, port: int, session_id: str, final: asyncio.Future[int]) -> None:
        self.port, self.session_id, self.final = port, session_id, final
        self.ids: list[int] = []
        self.reconnects = 0
        self.connected = asyncio.Event()

    def done(self) -> bool:
        return self.final.done() and bool(self.ids) and self.ids[-1] >= self.final.result()

    async def run(self) -> None:
        while not self.done():
            resume = {"Last-Event-ID": str(self.ids[-1])} if self.ids else {}
            client = await SSEClient.open(
                self.port, params={"sessionId": self.session_id}, headers=resume
            )
            try:
                if client.status != 200:  # every instance marked failed for a moment
                    await asyncio.sleep(0.2)
                    continue
                await self._read(client)
            except (EOFError, ConnectionError):
                pass  # the instance died under the stream
            finally:
                await client.close()
            if not self.done():
                self.reconnects += 1

    async def _read(self, client: SSEClient) -> None:
        while not self.done():
            event = await client.event(timeout=10)  # heartbeats every second
            if event.type == "connected":
                self.connected.set()
            elif event.type == "message":
                self.ids.append(int(event.json["data"]["id"]))


async def test_kill_9_of_the_relay_behind_nginx_loses_nothing_and_repeats_nothing(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """Writing 100 rows/s, the relay is killed: another broker takes over within 5 s; the dead
    broker's clients resume through nginx with their last id, and every client, theirs and
    the others', ends with every row exactly once."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [
        start_broker(
            BROKER_BUS_URL=redis.url, BROKER_BUS_STREAM=stream, BROKER_HEARTBEAT_SECONDS="1"
        )
        for _ in range(3)
    ]
    relay = the_relay(brokers)
    survivors = [b for b in brokers if b is not relay]
    nginx = Nginx.render([b.port for b in brokers]).start()
    final: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    followers = [Follower(nginx.port, session_id, final) for _ in range(9)]
    tasks = [asyncio.create_task(f.run()) for f in followers]
    writer = Writer(database, session_id, rate=100)
    try:
        for follower in followers:
            await asyncio.wait_for(follower.connected.wait(), 10)
        dead_streams = relay.stats()["totalConnections"]
        assert dead_streams > 0  # least_conn spread them
        writer.start()
        await asyncio.sleep(1)  # a second of rows before the kill
        assert relay.process is not None
        relay.process.kill()
        killed_at = time.monotonic()
        survivors[0].wait_until(
            lambda: any(bus_role(b) == "relay" for b in survivors), 5, "takeover"
        )
        took_over = time.monotonic() - killed_at
        await asyncio.sleep(2)  # two seconds of rows after it
        writer.stop()
        rows = stored_ids(database, session_id)
        final.set_result(rows[-1])
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        writer.stop()
        for task in tasks:
            task.cancel()
        nginx.stop()
        nginx.remove()
    print(
        f"\n{len(rows)} rows; takeover after {took_over:.2f} s;"
        f" reconnects {[f.reconnects for f in followers]}"
    )
    assert writer.failures == 0 and len(rows) >= 150  # ~100 rows/s for ~3 s, on a busy machine
    for follower in followers:
        assert sorted(follower.ids) == rows, follower.reconnects  # every row
        assert len(follower.ids) == len(set(follower.ids))  # none twice
    # The dead broker's clients, and only they, resumed.
    assert sum(f.reconnects for f in followers) == dead_streams


REDIS_CONNECTIONS = {"follower": 2, "relay": 3}  # reader and campaign; reader, appends, lease


def redis_connections(broker: BrokerProcess, redis: RedisServer) -> tuple[str, int]:
    """The broker's role and the Redis connections it holds; the role is read on both sides
    of the count, and is "changing" when they differ."""
    before = bus_role(broker)
    count = broker.connections_to(redis.port)
    after = bus_role(broker)
    return (before if before == after else "changing"), count


def holds_its_roles(brokers: list[BrokerProcess], redis: RedisServer) -> bool:
    return all(
        count == REDIS_CONNECTIONS.get(role)
        for role, count in (redis_connections(b, redis) for b in brokers)
    )


async def test_each_broker_holds_its_roles_redis_connections_across_a_takeover(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """A broker's Redis connections follow its role (`Bus.lease`): a follower two, the relay
    one more, its lease's, for as long as it holds the role. The shared pool used to keep a
    connection opened when a renewal overlapped an append, after the role had passed on too:
    an idle relay held two, a loaded one three, and the wal soak found its survivor a
    descriptor off its start. Checked at idle, after a kill -9 of the relay under load (the
    survivor), and after the new relay's backend is terminated (whoever wins)."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [on_bus(start_broker, redis, stream) for _ in range(2)]
    brokers[0].wait_until(
        lambda: sorted(bus_role(b) for b in brokers) == ["follower", "relay"],
        20,
        "one relay",
    )
    brokers[0].wait_until(lambda: holds_its_roles(brokers, redis), 10, "idle: counts by role")
    relay, survivor = sorted(brokers, key=lambda b: bus_role(b) != "relay")
    writer = Writer(database, session_id, rate=200)
    writer.start()
    try:
        survivor.wait_until(lambda: writer.committed > 100, 10, "rows through the relay")
        assert redis_connections(relay, redis) == ("relay", REDIS_CONNECTIONS["relay"])
        relay.signal(signal.SIGKILL)
        relay.wait(10)
        survivor.wait_until(lambda: bus_role(survivor) == "relay", 15, "takeover")
        taken = writer.committed
        survivor.wait_until(lambda: writer.committed > taken + 200, 10, "rows after it")
        assert redis_connections(survivor, redis) == ("relay", REDIS_CONNECTIONS["relay"])
        relay.start()
        relay.wait_until(lambda: holds_its_roles(brokers, redis), 10, "restarted: by role")
        assert database.terminate_listeners() >= 1  # the relay's session: it steps down
        survivor.wait_until(lambda: "relay" in {bus_role(b) for b in brokers}, 15, "re-elected")
        survivor.wait_until(lambda: holds_its_roles(brokers, redis), 10, "re-elected: by role")
    finally:
        writer.stop()
    assert writer.failures == 0


async def test_two_workers_on_the_bus_hold_one_listening_backend_and_both_deliver(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """`--workers 2`: one port, two processes; one relay among them, streams on both, every
    row delivered to every stream."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    broker = start_broker(BROKER_BUS_URL=redis.url, BROKER_BUS_STREAM=stream, BROKER_WORKERS="2")
    broker.wait_until(
        lambda: (
            sorted(str(s["bus"]["role"]) for s in broker.worker_stats(2).values())
            == ["follower", "relay"]
        ),
        20,
        "one relay, one follower",
    )
    assert database.listening_backends() == 1
    clients = [
        await connected(await SSEClient.open(broker.port, params={"sessionId": session_id}))
        for _ in range(20)
    ]
    streams = {pid: s["totalConnections"] for pid, s in broker.worker_stats(2).items()}
    print(f"\nstreams per worker: {streams}")
    assert sum(streams.values()) == len(clients) and min(streams.values()) > 0, streams
    rows = [database.insert(session_id, f"row {i}") for i in range(10)]
    for client in clients:
        got = await client.events_until(lambda e: e.id == str(rows[-1]), timeout=15)
        assert [int(e.json["data"]["id"]) for e in got if e.type == "message"] == rows
        await client.close()
    assert database.listening_backends() == 1
    # kill -9 of the parent: the workers die with it (no orphan keeps the port).
    workers = list(broker.worker_stats(2))
    assert broker.process is not None
    broker.process.kill()
    broker.process.wait(10)
    broker.wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10, "the workers gone"
    )


async def test_a_smaller_id_committed_while_no_relay_listens_is_backfilled_once(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """A draws the smaller id, B commits and reaches the stream; the relay dies, and A commits
    while no broker holds the role (the test holds the lock). The next relay's backfill finds A,
    though the stream holds only ids above it, and a client on the survivor receives it once."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [on_bus(start_broker, redis, stream) for _ in range(2)]
    relay = the_relay(brokers)
    survivor = next(b for b in brokers if b is not relay)
    client = await connected(await SSEClient.open(survivor.port, params={"sessionId": session_id}))
    with database.connect() as a:
        a.autocommit = False
        (id_a,) = a.execute(
            "INSERT INTO messages (session_id, content) VALUES (%s, 'A') RETURNING id",
            (session_id,),
        ).fetchone() or (0,)
        id_b = database.insert(session_id, "B")
        assert (await client.message(timeout=10)).json["data"]["id"] == str(id_b)
        assert relay.process is not None
        relay.process.kill()
        async with the_role_held_by_the_test(database, redis, stream, survivor):
            a.commit()  # no relay LISTENs now: only a backfill can find A
    assert (await client.message(timeout=10)).json["data"]["id"] == str(id_a)
    later = database.insert(session_id, "C")
    assert (await client.message(timeout=10)).json["data"]["id"] == str(later)  # not A again
    await client.close()


async def test_a_takeover_backfills_in_notify_mode_and_reads_only_the_slot_in_wal_mode(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
    capture: str,
) -> None:
    """The relay is killed with -9 and rows commit while no broker holds the role (the test
    holds the lock). The next relay's `relay_backfilled` says how it took over: in notify mode
    by a scan of the table against the stream, in wal mode (slot and stream intact) without
    one, the slot bringing those rows; either way a client on the survivor gets every row once,
    in order."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [on_bus(start_broker, redis, stream) for _ in range(2)]
    relay = the_relay(brokers)
    survivor = next(b for b in brokers if b is not relay)
    client = await connected(await SSEClient.open(survivor.port, params={"sessionId": session_id}))
    before = [database.insert(session_id, f"before {i}") for i in range(3)]
    for row in before:
        assert (await client.message(timeout=10)).id == str(row)
    assert relay.process is not None
    relay.process.kill()
    async with the_role_held_by_the_test(database, redis, stream, survivor):
        meanwhile = [database.insert(session_id, f"meanwhile {i}") for i in range(3)]
    after = database.insert(session_id, "after")
    got = [int((await client.message(timeout=10)).id or 0) for _ in range(4)]
    assert got == [*meanwhile, after]
    with pytest.raises(TimeoutError):  # none twice
        await client.message(timeout=1)
    await client.close()
    (took_over,) = [e for e in survivor.log_events() if e["event"] == "relay_backfilled"]
    print("\ntakeover:", {k: v for k, v in took_over.items() if k not in ("logger", "level")})
    assert took_over["scan"] == ("skipped" if capture == "wal" else "notify")
    assert took_over["rows"] == (0 if capture == "wal" else 3)


async def test_the_relay_backfills_and_a_follower_delivers_within_a_second_of_postgres(
    start_broker: Callable[..., BrokerProcess],
    redis: RedisServer,
    database: Database,
    session_id: str,
) -> None:
    """PostgreSQL stopped for 3 s, then started: the relay is back (its campaign's backoff is
    the listener's), its backfill runs on its own connection and appends the row committed
    first, and a follower delivers that row, all within a second of the server accepting
    connections (the listener's bound without a bus, test_recovery)."""
    stream = f"test:{uuid.uuid4().hex[:8]}"
    brokers = [on_bus(start_broker, redis, stream) for _ in range(2)]
    follower = next(b for b in brokers if b is not the_relay(brokers))
    client = await connected(await SSEClient.open(follower.port, params={"sessionId": session_id}))
    first = database.insert(session_id, "before")
    assert (await client.message(timeout=10)).id == str(first)
    backfills_before = sum(backfills(b) for b in brokers)

    def relay_back() -> bool:
        return any(b.stats()["listener"]["connected"] for b in brokers)

    back = FirstSuccess(relay_back)
    accepting, inserted = await postgres_outage(
        database, session_id, lambda: not follower.ready(), back
    )
    delivered = await client.message(timeout=10)
    delivered_at = time.monotonic()
    await asyncio.to_thread(back.join, 30)
    follower.wait_until(lambda: sum(backfills(b) for b in brokers) > backfills_before, 10)
    timings = {"relay": back.at - accepting.at, "delivered": delivered_at - accepting.at}
    print(
        "\nback after PostgreSQL accepted connections:",
        {k: round(v, 3) for k, v in timings.items()},
    )
    assert delivered.id == str(inserted[0])
    assert back.at > 0 and max(timings.values()) < 1.0, timings
    await client.close()


def backfills(broker: BrokerProcess) -> int:
    """The relay backfills this broker's log shows."""
    return sum(1 for event in broker.log_events() if event["event"] == "relay_backfilled")
