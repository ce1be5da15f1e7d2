"""A real Redis for tests: Debian's `redis-server` on a free port, in a temporary directory.

`stop()` and `start()` make a fault (the port stays the same, so clients reconnect to the same
URL); `kill()` is kill -9. Each start keeps the data: the server persists to an append-only file
fsynced on every write, as a production bus would be configured, so a restart loses nothing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.processes import free_port

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
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """With the password, if there is one."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

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
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
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
