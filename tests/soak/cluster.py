"""The soak's processes: one embedded PostgreSQL, broker processes, nginx in front; with
`capture="wal"` (BROKER_CAPTURE=wal) also a Redis bus, since without one a single broker
process reads the slot and the others are not ready: the bus's relay is the slot's reader.

Everything is started here and stopped by `Cluster.stop`, whatever happened before; the run
directory keeps the logs (broker-N.log, nginx's) and the report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from broker.database import EmbeddedPostgres, migrate
from broker.feeds.listener import APPLICATION_NAME as LISTENER_NAME
from broker.feeds.walcapture import READER_NAME
from broker.store import APPLICATION_NAME as STORE_NAME
from tests.support.nginx import Nginx
from tests.support.processes import BrokerProcess, tcp_inodes
from tests.support.redis import RedisServer


@dataclass(frozen=True)
class Usage:
    """What one broker process holds at a moment. Its descriptors are split into HTTP
    connections (nginx's: streams or idle upstream keep-alive; the soak's own stats
    requests), Unix sockets (the PostgreSQL connections, whose pool grows and shrinks, and
    the event loop's own pair), and everything else, which must not change."""

    rss_kib: int
    fds: int
    http_connections: int
    unix_sockets: int
    streams: int
    channels: int
    tasks: int
    others: tuple[str, ...] = ()  # what the other descriptors are, for a report that differs
    role: str | None = None  # on a bus (the wal soak): "relay" or "follower"

    @property
    def other_fds(self) -> int:
        return self.fds - self.http_connections - self.unix_sockets

    def as_json(self) -> dict[str, Any]:
        return {
            "rssKiB": self.rss_kib,
            "fds": self.fds,
            "httpConnections": self.http_connections,
            "unixSockets": self.unix_sockets,
            "otherFds": self.other_fds,
            "streams": self.streams,
            "channels": self.channels,
            "tasks": self.tasks,
            "others": list(self.others),
            "role": self.role,
        }


@dataclass
class Cluster:
    run_dir: Path
    capture: str = "notify"
    brokers: list[BrokerProcess] = field(default_factory=list)
    database: EmbeddedPostgres | None = None
    nginx: Nginx | None = None
    redis: RedisServer | None = None
    _data: Path | None = None  # the embedded cluster's temporary directory

    @property
    def url(self) -> str:
        assert self.database is not None
        return self.database.url

    def start(self, count: int) -> Cluster:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for old in [*self.run_dir.glob("*.log"), self.run_dir / "report.json"]:
            old.unlink(missing_ok=True)  # a previous run's
        # Not in the run directory: the embedded server's user must reach it (as root, that
        # user is not root), and pgsse must not change the mode of directories it did not make.
        self._data = Path(tempfile.mkdtemp(prefix="pgsse-soak-"))
        self.database = EmbeddedPostgres(self._data / "data")
        self.database.start()
        migrate(self.database.url, capture=self.capture)
        env = {
            "DATABASE_URL": self.database.url,
            "BROKER_MIGRATE": "false",
            "BROKER_LOG_FORMAT": "json",
            "BROKER_HEARTBEAT_SECONDS": "5",
        }
        if self.capture == "wal":
            self.redis = RedisServer(fsync="everysec").start()
            env |= {"BROKER_CAPTURE": "wal", "BROKER_BUS_URL": self.redis.url}
        for n in range(count):
            broker = BrokerProcess(env, self.run_dir / f"broker-{n}.log")
            self.brokers.append(broker.start(wait_ready=False))
        for broker in self.brokers:
            broker.wait_until(broker.ready, 30, "broker ready")
        self.nginx = Nginx.render([broker.port for broker in self.brokers]).start()
        return self

    @property
    def port(self) -> int:
        assert self.nginx is not None
        return self.nginx.port

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(query.encode(), params).fetchall()

    def backends(self, application_name: str = LISTENER_NAME) -> int:
        rows = self.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
        return int(rows[0][0])

    def store_backends(self) -> int:
        return self.backends(STORE_NAME)

    def terminate_listeners(self) -> int:
        """The listening connections, and with wal the slot's stream."""
        rows = self.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name IN (%s, %s)",
            (LISTENER_NAME, READER_NAME),
        )
        return len(rows)

    def accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def kill_and_restart(self, index: int) -> float:
        """SIGKILL broker `index`, start it again on its port; seconds until it is ready."""
        broker = self.brokers[index]
        assert broker.process is not None
        broker.process.send_signal(signal.SIGKILL)
        broker.process.wait(10)
        started = time.monotonic()
        broker.start(wait_ready=False)
        broker.wait_until(broker.ready, 30, "restarted broker ready")
        return time.monotonic() - started

    def usage(self, broker: BrokerProcess) -> Usage:
        assert broker.process is not None
        stats = broker.stats()
        # The socket tables are read before and after the descriptors, so that a connection
        # closing meanwhile (this very stats request's) is still classed as one.
        connections, unix = tcp_inodes(broker.port), _unix_socket_inodes()
        fd_dir = Path(f"/proc/{broker.process.pid}/fd")
        links = []
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):  # closed meanwhile
                links.append(os.readlink(fd_dir / fd))
        connections |= tcp_inodes(broker.port)
        unix |= _unix_socket_inodes()
        inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
        classed = connections | unix
        others = sorted(link.split("[")[0] for link in links if link[8:-1] not in classed)
        return Usage(
            rss_kib=broker.rss_kib(),
            fds=len(links),
            http_connections=len(inodes & connections),
            unix_sockets=len(inodes & unix),
            streams=int(stats["totalConnections"]),
            channels=len(stats["channels"]),
            tasks=int(stats["tasks"]),
            others=tuple(others),
            role=(stats.get("bus") or {}).get("role"),
        )

    def stop(self) -> None:
        """Stop every process this cluster started; safe to call after any failure."""
        for broker in self.brokers:
            try:
                broker.stop()
            except Exception as exc:  # keep stopping the others
                print(f"soak: stopping broker on {broker.port}: {exc!r}", flush=True)
        if self.nginx is not None:
            self.nginx.stop()
            for name in ("error.log", "stderr.log", "access.log"):
                source = self.nginx.run_dir / name
                if source.exists():
                    shutil.copy(source, self.run_dir / f"nginx-{name}")
            self.nginx.remove()
        if self.redis is not None:
            self.redis.destroy()
        if self.database is not None:
            self.database.stop("fast")
        if self._data is not None:
            shutil.rmtree(self._data, ignore_errors=True)


def _unix_socket_inodes() -> set[str]:
    with open("/proc/net/unix") as lines:
        next(lines)
        return {line.split()[6] for line in lines}
