"""The processes a benchmark runs: PostgreSQL, the broker, and what /proc says about them.

CPU placement: the bench process moves itself to the load CPU (1) before it starts anything,
so PostgreSQL, the writers and the clients inherit it; the broker alone runs on CPU 0 under
`taskset -c 0`. On a machine with one CPU nothing is pinned.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg

from broker.database import EmbeddedPostgres, migrate
from tests.support.processes import free_port, http_json

BROKER_CPU = 0
LOAD_CPU = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def pinning_available() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2


def pin_self_to_load_cpu() -> bool:
    """Move this process (and so every child it starts from now on) to the load CPU."""
    if not pinning_available():
        return False
    os.sched_setaffinity(0, {LOAD_CPU})
    return True


def raise_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "pinned": pinning_available(),
        "file_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


class Database:
    """The embedded PostgreSQL of a run, in a temporary directory, with the schema applied."""

    def __init__(self, data_dir: Path) -> None:
        self.server = EmbeddedPostgres(data_dir)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> Database:
        self.server.start()
        migrate(self.url)
        return self

    def stop(self) -> None:
        self.server.stop("fast")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql.encode(), params).fetchall()

    def last_id(self) -> int:
        return int(self.query("SELECT coalesce(max(id), 0) FROM messages")[0][0])

    def backends(self) -> dict[str, Any]:
        """Client backends other than this query's own, by their last statement.

        PostgreSQL shows no other session's LISTEN state, so the listening backend is told by
        its last statement: the LISTEN itself, or the listener's periodic `SELECT 1` health
        check (no other broker connection runs that statement).
        """
        rows = self.query(
            "SELECT left(query, 60), count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " GROUP BY 1 ORDER BY 2 DESC"
        )
        by_query = {str(query): int(count) for query, count in rows}
        listening = sum(
            count
            for query, count in by_query.items()
            if query.upper().startswith("LISTEN ") or query.strip() == "SELECT 1"
        )
        return {
            "client_backends": sum(by_query.values()),
            "listening_backends": listening,
            "by_last_statement": by_query,
        }


@dataclass
class ProcessSample:
    at: float
    rss_kb: int
    cpu_seconds: float
    cpus: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    system_seconds: float = 0.0  # the part of cpu_seconds spent in the kernel


def cpu_ticks() -> dict[str, tuple[int, int, int]]:
    """Per CPU from /proc/stat: (busy, steal, total) clock ticks since boot."""
    ticks: dict[str, tuple[int, int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *values = line.split()
        numbers = [int(v) for v in values[:8]]
        idle = numbers[3] + numbers[4]  # idle + iowait
        steal = numbers[7] if len(numbers) > 7 else 0
        total = sum(numbers)
        ticks[name] = (total - idle - steal, steal, total)
    return ticks


@dataclass
class BrokerProcess:
    """`python -m broker serve` on a free 127.0.0.1 port, pinned to the broker CPU."""

    database_url: str
    log_path: Path
    queue_size: int = 1_000
    max_connections: int = 20_000
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # What runs the broker; the default is the real command line.
    command: tuple[str, ...] = ("-m", "broker", "serve")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "BROKER_MIGRATE": "false",
            "BROKER_LOG_FORMAT": "json",
            "BROKER_HOST": "127.0.0.1",
            "BROKER_PORT": str(self.port),
            "BROKER_MAX_CONNECTIONS": str(self.max_connections),
            "BROKER_QUEUE_SIZE": str(self.queue_size),
            **self.extra_env,
        }
        argv = [sys.executable, *self.command]
        taskset = shutil.which("taskset")
        if taskset and pinning_available():
            argv = [taskset, "-c", str(BROKER_CPU), *argv]  # taskset execs: same pid
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"broker not ready after {timeout}s; log: {self.log_path}")
            time.sleep(0.05)
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"broker exited {self.process.returncode}; log: {self.log_path}")
        try:
            return http_json(f"http://127.0.0.1:{self.port}/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def stats(self) -> dict[str, Any]:
        status, body = http_json(f"http://127.0.0.1:{self.port}/api/sse/stats", timeout=10)
        if status != 200:
            raise RuntimeError(f"stats answered {status}: {body}")
        data: dict[str, Any] = body["data"]
        return data

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM (kB) and thread count from /proc/PID/status."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                values[name] = int(rest.split()[0])
        return values

    def rss_kb(self) -> int:
        return self.status()["VmRSS"]

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def tcp_sockets(self) -> int:
        """TCP sockets the broker holds (its listening socket and client connections; its
        PostgreSQL connections are Unix sockets here)."""
        inodes = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        tcp = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            tcp.update(line.split()[9] for line in lines if len(line.split()) > 9)
        return len(inodes & tcp)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def sample(self) -> ProcessSample:
        user, system = cpu_times(self.pid)
        return ProcessSample(time.monotonic(), self.rss_kb(), user + system, cpu_ticks(), system)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` so far."""
    return sum(cpu_times(pid))


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


class Sampler:
    """Samples a broker's RSS and CPU time every `interval` seconds in a thread."""

    def __init__(self, broker: BrokerProcess, interval: float = 0.25) -> None:
        self.broker = broker
        self.interval = interval
        self.samples: list[ProcessSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.broker.sample())
            except (OSError, IndexError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak_rss_kb(self) -> int:
        return max((s.rss_kb for s in self.samples), default=0)

    def window(self, start: float, end: float) -> dict[str, float | None]:
        """CPU use between two monotonic times, as shares of one core: the broker's, and each
        CPU's whole (every process on it, other people's too), and the hypervisor's steal."""
        inside = [s for s in self.samples if start <= s.at <= end]
        if len(inside) < 2 or inside[-1].at <= inside[0].at:
            return {"broker_cpu": None}
        first, last = inside[0], inside[-1]
        span = last.at - first.at
        result: dict[str, float | None] = {
            "broker_cpu_seconds": round(last.cpu_seconds - first.cpu_seconds, 3),
            "broker_cpu_system_seconds": round(last.system_seconds - first.system_seconds, 3),
            "broker_cpu": round((last.cpu_seconds - first.cpu_seconds) / span, 3),
        }
        for name, (busy, steal, total) in last.cpus.items():
            before = first.cpus.get(name)
            if before is None or total <= before[2]:
                continue
            result[f"{name}_busy"] = round((busy - before[0]) / (total - before[2]), 3)
            result[f"{name}_steal"] = round((steal - before[1]) / (total - before[2]), 3)
        if "cpu0_busy" in result and pinning_available():
            others = (result["cpu0_busy"] or 0) - (result["broker_cpu"] or 0)
            result["cpu0_others"] = round(max(0.0, others), 3)
        return result

    def cpu_share(self, start: float, end: float) -> float | None:
        """The broker's CPU use between two monotonic times, as a share of one core."""
        return self.window(start, end)["broker_cpu"]


@contextmanager
def profiled(
    pid: int, out: Path, seconds: float, rate: int = 200, native: bool = False
) -> Iterator[Path | None]:
    """py-spy samples `pid` for up to `seconds` into `out` (collapsed stacks), if installed;
    `native` adds C frames (uvloop, httptools, the write syscalls)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        yield None
        return
    command = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
        *(["--native"] if native else []),
    ]
    with (out.with_suffix(".log")).open("wb") as log:
        spy_process = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        yield out
    finally:
        try:
            spy_process.wait(seconds + 30)
        except subprocess.TimeoutExpired:
            spy_process.terminate()
            spy_process.wait(10)


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(frame) for frame in stack.split(";")]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(counts: dict[str, int]) -> list[list[Any]]:
        best = sorted(counts.items(), key=lambda item: item[1], reverse=True)[:top]
        return [[name, round(100 * n / total, 1)] for name, n in best]

    return {"samples": total, "self_percent": ranked(own), "inclusive_percent": ranked(inclusive)}


def _short_frame(frame: str) -> str:
    """`send (uvicorn/protocols/http/httptools_impl.py:123)` -> `send (httptools_impl.py)`."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    parts = file.split("/")
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    return f"{name} ({short})"


def _bare_listen(url: str, channel: str, seconds: float, pipe: Connection) -> None:
    if pinning_available():
        os.sched_setaffinity(0, {BROKER_CPU})
    received = 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        pipe.send("listening")
        for _ in conn.notifies(timeout=seconds):
            received += 1
    pipe.send(received)


class BareListener:
    """A plain psycopg connection that LISTENs and only counts, on the broker's CPU: what
    PostgreSQL's NOTIFY delivery costs the writer, with no broker work at all."""

    def __init__(self, url: str, channel: str, seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, theirs = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_bare_listen, args=(url, channel, seconds, theirs), daemon=True
        )
        self.seconds = seconds

    def __enter__(self) -> BareListener:
        self._process.start()
        if not self._pipe.poll(30) or self._pipe.recv() != "listening":
            raise RuntimeError("bare listener did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.join(self.seconds + 30)
        if self._process.is_alive():
            self._process.terminate()

    def received(self) -> int:
        return int(self._pipe.recv()) if self._pipe.poll(self.seconds + 30) else -1
