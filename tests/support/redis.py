"""A real Redis for tests: Debian's `redis-server` on a free port, in a temporary directory.

`stop()` and `start()` make a fault (the port stays the same, so clients reconnect to the same
URL); `kill()` is kill -9. Each start keeps the data: the server persists to an append-only file
fsynced on every write, as a production bus would be configured, so a restart loses nothing.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from broker.feeds.bus import Bus
from tests.support.processes import BrokerProcess, free_port

REDIS_SERVER = "redis-server"


def available() -> bool:
    return shutil.which(REDIS_SERVER) is not None


class RedisServer:
    """One `redis-server` process; `url` is what BROKER_BUS_URL takes."""

    def __init__(
        self, root: Path | None = None, fsync: str = "always", password: str | None = None
    ) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="pgsse-redis-"))
        self.fsync = fsync  # appendfsync: "always" for the tests, "everysec" for the bench
        self.password = password  # requirepass, given in a configuration file
        self.tls_ca: Path | None = None  # with `use_tls`: TLS only, a certificate of this CA
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def use_tls(self) -> RedisServer:
        """Serve TLS only, with a certificate for 127.0.0.1 signed by a CA made here
        (`tls_ca`); before `start`."""
        make_certificates(self.root)
        self.tls_ca = self.root / "ca.crt"
        return self

    @property
    def url(self) -> str:
        """With the password, if there is one; `rediss://` with TLS (the CA not named)."""
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls_ca else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    @property
    def open_url(self) -> str:
        """Without the password."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        config = self.root / "redis.conf"
        config.write_text(f"requirepass {self.password}\n" if self.password else "")
        args = [
            REDIS_SERVER,
            str(config),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.root),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--daemonize", "no",
            "--logfile", str(self.root / "redis.log"),
        ]  # fmt: skip
        if self.tls_ca is not None:
            args[2:4] = ["--port", "0", "--tls-port", str(self.port)]
            args += [
                "--tls-cert-file", str(self.root / "server.crt"),
                "--tls-key-file", str(self.root / "server.key"),
                "--tls-ca-cert-file", str(self.tls_ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not answering after {timeout}s: {self.log()}")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                if self.tls_ca is None:
                    raw.sendall(b"PING\r\n")
                    reply = raw.recv(64)
                else:
                    context = ssl.create_default_context(cafile=str(self.tls_ca))
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                        sock.sendall(b"PING\r\n")
                        reply = sock.recv(64)
                # NOAUTH: it answers, it wants the password
                return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, as a restart by the service manager does; waits for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def make_certificates(directory: Path) -> None:
    """ca.crt, and server.crt/server.key for IP 127.0.0.1 signed by it, with openssl."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.crt", "-days", "2", "-subj", "/CN=pgsse test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "2",
            "-extfile", "san.ext")  # fmt: skip


async def bus_identity(redis: RedisServer, stream: str) -> str:
    """The identity the brokers on `stream` keep in Redis (part of their relay lock's key)."""
    bus = Bus(redis.url, stream)
    try:
        return await bus.identity()
    finally:
        await bus.close()


def on_bus(
    start_broker: Callable[..., BrokerProcess], redis: RedisServer, stream: str, **env: str
) -> BrokerProcess:
    """A broker on `stream` of `redis`."""
    return start_broker(BROKER_BUS_URL=redis.url, BROKER_BUS_STREAM=stream, **env)


def bus_role(broker: BrokerProcess) -> str:
    """ "relay" or "follower", as its stats say."""
    return str(broker.stats()["bus"]["role"])


def the_relay(brokers: list[BrokerProcess]) -> BrokerProcess:
    """The broker of `brokers` elected relay, waited for."""
    brokers[0].wait_until(lambda: any(bus_role(b) == "relay" for b in brokers), 20, "a relay")
    return next(b for b in brokers if bus_role(b) == "relay")
