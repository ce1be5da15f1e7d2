"""Real broker processes for tests: `python -m broker serve` on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_json(url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET `url`; (status, parsed JSON body), for 4xx/5xx too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@dataclass
class BrokerProcess:
    """One broker serving on `port`, its log in `log_path`."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 20.0) -> BrokerProcess:
        # BROKER_HOST="" in `env`: the broker's own default.
        env = {**os.environ, "BROKER_HOST": "127.0.0.1", **self.env, "BROKER_PORT": str(self.port)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "broker", "serve"],
                env=env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        if wait_ready:
            self.wait_until(lambda: self.ready(), timeout, "broker ready")
        return self

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"broker exited {self.process.returncode}:\n{self.log()}")
        try:
            return self.get("/readyz")[0] == 200
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET `path`; a refused connection from a broker that has exited says so, with its
        log (a dead broker is the finding, not the socket error)."""
        try:
            return http_json(self.base_url + path)
        except OSError:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"broker exited {self.process.returncode}:\n{self.log()}"
                ) from None
            raise

    def stats(self) -> dict[str, Any]:
        status, body = self.get("/api/sse/stats")
        assert status == 200, body
        data: dict[str, Any] = body["data"]
        return data

    def worker_stats(self, workers: int, timeout: float = 20.0) -> dict[int, dict[str, Any]]:
        """With `--workers`: each worker's stats by its pid, asked on new connections (the
        kernel picks the worker) until all `workers` answered."""
        seen: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only workers {sorted(seen)} answered in {timeout}s")
            stats = self.stats()
            seen[int(stats["pid"])] = stats
        return seen

    def wait_until(self, condition: Any, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.log()}")
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def rss_kib(self) -> int:
        """The broker process's resident memory, KiB."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def connections_to(self, port: int) -> int:
        """The process's TCP connections to `port` on any address (Redis's, say)."""
        assert self.process is not None
        fd_dir = Path(f"/proc/{self.process.pid}/fd")
        inodes = set()
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):  # closed meanwhile
                link = os.readlink(fd_dir / fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        return len(inodes & tcp_inodes(port, remote=True))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events


def tcp_inodes(port: int, remote: bool = False) -> set[str]:
    """Inodes of the TCP sockets (IPv4 and IPv6) with local port `port`, in any state but
    LISTEN; with `remote`, of those connected to `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                address = fields[2] if remote else fields[1]
                if fields[3] != "0A" and int(address.rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are free now.

    Drawn below Linux's ephemeral range (32768 and up), where the connections of earlier
    tests linger in TIME_WAIT; SO_REUSEADDR as uvicorn and nginx set it.
    """
    for _ in range(100):
        first = random.randrange(20000, 32768 - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports found")
