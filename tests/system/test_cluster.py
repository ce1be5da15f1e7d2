"""`make cluster` (deploy/cluster.sh): Redis, brokers on the bus and nginx; it checks its ports
before starting anything, an instance that fails is reported with the last lines of its log,
not only a status, and one that dies is started again while the others keep serving."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.database import Database
from tests.support.nginx import CLUSTER_SH, ClusterScript, require_nginx
from tests.support.processes import consecutive_free_ports, free_port, http_json
from tests.support.redis import available as redis_available
from tests.support.sse import Follower, SSEClient


def run_cluster(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    require_nginx()
    return subprocess.run(
        [str(CLUSTER_SH), *args],
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PGSSE_RUN_DIR": str(tmp_path / "run"),
            "BROKER_LOG_FORMAT": "json",
            "PGSSE_REDIS_PORT": str(free_port()),  # not 6380: other runs may hold it
            **env,
        },
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


def test_a_busy_port_stops_the_cluster_before_anything_starts(
    tmp_path: Path, busy_port: int
) -> None:
    public = free_port()
    done = run_cluster(tmp_path, "1", str(public), str(busy_port), DATABASE_URL="")
    assert done.returncode == 1
    assert f"port(s) {busy_port} already in use" in done.stderr
    assert not list((tmp_path / "run").glob("broker-*.log")), "an instance was started"
    assert "embedded_postgres_started" not in done.stderr


def test_a_failing_instance_is_shown_with_its_log(
    tmp_path: Path, busy_port: int, database: Database
) -> None:
    port = free_port()
    done = run_cluster(
        tmp_path,
        "1",
        str(free_port()),
        str(port),
        DATABASE_URL=database.url,
        BROKER_ADMIN_PORT=str(busy_port),  # every instance fails to bind it
    )
    assert done.returncode == 1
    assert f"the instance on port {port} exited" in done.stderr
    # Its log's last line, quoted: the one-line reason naming the setting.
    assert f"pgsse: invalid BROKER_ADMIN_PORT={busy_port}" in done.stderr
    assert "cluster stopped" in done.stdout


async def test_the_cluster_runs_three_brokers_on_a_bus_it_starts_behind_nginx(
    database: Database, session_id: str
) -> None:
    """`make cluster`: Redis, three brokers on the bus (one listening backend, one relay),
    nginx in front delivering; SIGTERM stops everything, Redis last."""
    require_nginx()
    if not redis_available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    public, redis_port, first = free_port(), free_port(), consecutive_free_ports(3)
    env = {"DATABASE_URL": database.url, "PGSSE_REDIS_PORT": str(redis_port)}
    cluster = ClusterScript(env, 3, public, first).start()
    try:
        assert "on the bus (redis-server on" in cluster.output()
        ports = [first + i for i in range(3)]

        def roles() -> list[str]:
            stats = [http_json(f"http://127.0.0.1:{port}/api/sse/stats")[1] for port in ports]
            return sorted(str(s["data"]["bus"]["role"]) for s in stats)

        deadline = time.monotonic() + 20
        while roles() != ["follower", "follower", "relay"]:
            assert time.monotonic() < deadline, roles()
            await asyncio.sleep(0.05)
        assert database.listening_backends() == 1
        client = await SSEClient.open(public, params={"sessionId": session_id})
        await client.events_until(lambda event: event.type == "connected")
        row = database.insert(session_id, "through the cluster")
        assert (await client.message(timeout=10)).json["data"]["id"] == str(row)
        await client.close()
    finally:
        code = cluster.stop()
        output = cluster.output()
        cluster.remove()
    assert code == 0, output
    assert "cluster stopped" in output
    with socket.socket() as sock:  # Redis is gone too: its port is free again
        sock.bind(("127.0.0.1", redis_port))


async def test_a_killed_instance_is_started_again_and_clients_keep_every_row(
    database: Database, session_id: str
) -> None:
    """The README's promise on `make cluster`: kill -9 of the instance holding streams, while
    rows are written. The script keeps the pool up (it used to stop everything), the clients
    reconnect through nginx with Last-Event-ID and have every row once, in order, and the
    instance is started again on its port."""
    require_nginx()
    public, first = free_port(), consecutive_free_ports(2)
    env = {"DATABASE_URL": database.url, "PGSSE_REDIS_PORT": str(free_port())}
    cluster = ClusterScript(env, 2, public, first).start()
    try:
        ports = [first, first + 1]
        followers = [Follower(public, session_id) for _ in range(4)]
        tasks = [asyncio.create_task(follower.run()) for follower in followers]
        await asyncio.wait_for(asyncio.gather(*(f.opened.wait() for f in followers)), 15)
        database.insert(session_id, "start")  # every client has a last id before the kill
        await asyncio.wait_for(asyncio.gather(*(f.first_row.wait() for f in followers)), 15)
        stats = [http_json(f"http://127.0.0.1:{port}/api/sse/stats")[1]["data"] for port in ports]
        counts = [s["totalConnections"] for s in stats]
        victim_port, victim_pid = (
            ports[counts.index(max(counts))],
            stats[counts.index(max(counts))]["pid"],
        )
        assert max(counts) > 0

        for n in range(60):
            await asyncio.to_thread(database.insert, session_id, f"m{n}")
            if n == 20:
                os.kill(int(victim_pid), signal.SIGKILL)
            await asyncio.sleep(0.01)
        database.insert(session_id, "end")
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

        expected = [
            row[0]
            for row in database.query(
                "SELECT id FROM messages WHERE session_id = %s ORDER BY id", (session_id,)
            )
        ]
        for follower in followers:
            assert follower.ids == expected
            assert follower.refused == []
        assert sum(f.connections - 1 for f in followers) >= max(counts)

        # The pool is still up, and the instance serves its port again, a new process.
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = http_json(f"http://127.0.0.1:{victim_port}/api/sse/stats")
                if status == 200 and body["data"]["pid"] != victim_pid:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, cluster.run_report()
            await asyncio.sleep(0.1)
        assert cluster.process is not None and cluster.process.poll() is None
        output = cluster.output()
        assert f"the instance on port {victim_port} ended (status 137)" in output
        assert "starting it again" in output
    finally:
        code = cluster.stop()
        output = cluster.run_report()
        cluster.remove()
    assert code == 0, output
    assert "cluster stopped" in output


async def test_an_instance_that_cannot_start_again_is_left_down_and_the_pool_serves(
    database: Database, session_id: str
) -> None:
    """An instance killed whose port is then taken fails each restart at once: after the
    third the script leaves it down, says so, and keeps serving through the other."""
    require_nginx()
    public, first = free_port(), consecutive_free_ports(2)
    env = {"DATABASE_URL": database.url, "PGSSE_CLUSTER_BUS": "no"}
    cluster = ClusterScript(env, 2, public, first).start()
    squatter = socket.socket()
    try:
        status, body = http_json(f"http://127.0.0.1:{first}/api/sse/stats")
        assert status == 200
        os.kill(int(body["data"]["pid"]), signal.SIGKILL)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:  # the port is free once the killed process is gone
            try:
                squatter.bind(("127.0.0.1", first))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed instance kept its port"
                await asyncio.sleep(0.02)
        squatter.listen()
        left_down = f"the instance on port {first} ended 3 times within 10 s of starting"
        deadline = time.monotonic() + 30
        while left_down not in cluster.output():
            assert time.monotonic() < deadline, cluster.run_report()
            assert cluster.process is not None and cluster.process.poll() is None
            await asyncio.sleep(0.1)
        assert "leaving it down" in cluster.output()
        client = await SSEClient.open(public, params={"sessionId": session_id})
        assert client.status == 200
        await client.events_until(lambda event: event.type == "connected")
        row = database.insert(session_id, "served by the one left")
        assert (await client.message(timeout=10)).json["data"]["id"] == str(row)
        await client.close()
        assert cluster.process.poll() is None
    finally:
        squatter.close()
        code = cluster.stop()
        output = cluster.run_report()
        cluster.remove()
    assert code == 0, output
