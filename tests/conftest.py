"""Fixtures: one real PostgreSQL cluster per test session, real broker processes; the tiers.

Two tiers: everything under tests/system/ runs real processes (brokers, PostgreSQL restarts,
nginx, Redis, Chromium, podman) and is marked `system`; the rest is the fast tier, the
modules in process (`make test-fast`). A full run takes the fast tier first, so a broken
module shows before minutes of system tests.

The cluster is the embedded server of `broker.database`, in a temporary directory, so tests
may stop, restart or `pg_terminate_backend` it. Tests isolate themselves by using fresh
session ids (`session_id`), never by emptying the table. The directory is mkdtemp's, mode
700: run by root, the cluster is placed where its user can reach it
(`broker.embedded.placement`), and
`Database.modes_before` lets a test check that no directory's mode changed.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from broker.database import EmbeddedPostgres, migrate
from broker.feeds.bus import Bus
from broker.signing import RowKey
from tests.support.database import Database, chain_modes
from tests.support.pgproxy import PostgresProxy
from tests.support.processes import BrokerProcess
from tests.support.redis import RedisServer, available
from tests.support.sse import OPEN_CLIENTS

SYSTEM = Path(__file__).parent / "system"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests under tests/system/ `system`, and run them after the fast tier."""
    for item in items:
        if SYSTEM in item.path.parents:
            item.add_marker(pytest.mark.system)
    items.sort(key=lambda item: SYSTEM in item.path.parents)  # stable: modules stay whole


@pytest.fixture(scope="session")
def cluster() -> Iterator[Database]:
    """The session's cluster, its database `postgres` migrated with BROKER_CAPTURE=notify."""
    # Not in pytest's numbered temp dirs: pytest prunes old ones, and a concurrent session
    # (two developers' runs on one machine) could prune the directory of a running cluster.
    root = Path(tempfile.mkdtemp(prefix="pgsse-test-"))
    modes_before = chain_modes(root)
    server = EmbeddedPostgres(root / "data")
    try:
        server.start()
        migrate(server.url)
        yield Database(server, root, modes_before)
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def wal_cluster_database(cluster: Database) -> Database:
    """Database `pgsse_wal` of the same cluster, migrated with BROKER_CAPTURE=wal (its own
    slot): the other tests' NOTIFY trigger is untouched."""
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE pgsse_wal")
    wal = cluster.sibling("pgsse_wal", capture="wal", slot="pgsse_wal")
    migrate(wal.url, capture="wal", slot="pgsse_wal")
    return wal


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `captures` (a whole module: `pytestmark`) runs once per capture mode."""
    if metafunc.definition.get_closest_marker("captures") and "capture" in metafunc.fixturenames:
        metafunc.parametrize("capture", ["notify", "wal"], indirect=True)


@pytest.fixture
def capture(request: pytest.FixtureRequest) -> str:
    """BROKER_CAPTURE of the test's database and brokers: notify unless marked `captures`."""
    return str(getattr(request, "param", "notify"))


@pytest.fixture
def database(request: pytest.FixtureRequest, cluster: Database, capture: str) -> Database:
    """The database tests write to: the cluster's, or with capture `wal` its wal database."""
    if capture == "wal":
        wal: Database = request.getfixturevalue("wal_cluster_database")
        return wal
    return cluster


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Close the SSE clients a test left open (after a failed assertion, say)."""
    yield
    while OPEN_CLIENTS:
        await OPEN_CLIENTS[-1].close()


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory like `/root`: mode 700, inside a fresh temporary directory (mode 700)."""
    top = Path(tempfile.mkdtemp(prefix="pgsse-home-"))
    home = top / "root"
    home.mkdir()
    home.chmod(0o700)
    yield home
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process (here: a socket) listens on, as `make run` holds 5001."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def session_id() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start_broker(database: Database, tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start a broker process with extra environment settings; all are stopped at teardown."""
    started: list[BrokerProcess] = []

    def start(wait_ready: bool = True, **env: str) -> BrokerProcess:
        settings = {
            "DATABASE_URL": database.url,
            "BROKER_MIGRATE": "false",
            "BROKER_LOG_FORMAT": "json",
            **database.broker_env(),
            **env,
        }
        broker = BrokerProcess(settings, tmp_path / f"broker-{len(started)}.log")
        started.append(broker)
        return broker.start(wait_ready=wait_ready)

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def pgproxy(database: Database) -> Iterator[PostgresProxy]:
    """A proxy to the cluster that can keep brokers' listeners out (`listener_blocked`)."""
    dbname = database.url.split("?", 1)[0].rsplit("/", 1)[1]
    proxy = PostgresProxy(database.server.socket_dir, dbname).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def broker(start_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return start_broker()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A fresh redis-server on a free port; skip locally without one, fail under CI."""
    if not available():
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed, but CI is set: .ci/run must install it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer().start()
    yield server
    server.destroy()


@pytest.fixture
async def bus(redis: RedisServer) -> AsyncIterator[Bus]:
    """A stream of its own on a fresh Redis, for the in-process bus and relay tests."""
    bus = Bus(redis.url, f"test:{uuid.uuid4().hex[:8]}", maxlen=1_000)
    bus.trust(RowKey(os.urandom(64)))  # a relay replaces it with the database's own
    yield bus
    await bus.close()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter, as may each parent (pytest's tmp_path is below a
    mode-700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="pgsse-open-"))
    path.chmod(0o755)
    yield path
    for directory in path.rglob("*"):
        if directory.is_dir() and not directory.is_symlink():
            directory.chmod(0o755)
    shutil.rmtree(path)
