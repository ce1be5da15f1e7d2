"""Where the CPU of a pgbench phase goes: PostgreSQL's processes by role, and each CPU whole.

`CpuWindow` reads /proc twice inside a running phase (its first and last moments left out:
connections opening, pgbench's backends exiting) and gives each role's CPU as a share of
one core over the window:

- `walsender`: the backend of a replication connection (`backend_type = 'walsender'`): the
  logical decoding of every transaction, and its sends;
- `writer_backends`: pgbench's sessions (`application_name = 'pgbench'`);
- `pgsse_backends`: every other client backend (the broker's connections: the capture's
  visibility query per batch, the slot monitor, the store);
- `postgres_other`: the server's own processes (walwriter, checkpointer, autovacuum, ...);
- the named processes the caller passes (pgbench itself, the SSE clients, the broker,
  pg_recvlogical);
- `cpu0_busy`, `cpu1_busy` from /proc/stat (every process on that CPU, other people's too),
  `cpu0_steal`, `cpu1_steal` (the hypervisor's), and `cpu1_rest`: CPU 1's busy time that
  none of the roles on it accounts for (other work on the machine, interrupts);
- the walsender's wake-ups (voluntary context switches) and read and write system calls per
  second (/proc/PID/status, /proc/PID/io): how often it sleeps and sends, which a reader's
  pace changes.

The bench runs as the server's user or as root, so every backend's /proc/PID/stat is
readable. A process that exits inside the window is left out of its role.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.bench.harness import cpu_ticks, cpu_times

# Roles that run on the load CPU (1) in the bench; the rest of CPU 1 is `cpu1_rest`.
ON_LOAD_CPU = ("walsender", "writer_backends", "pgsse_backends", "postgres_other")


def backend_roles(url: str) -> dict[int, str]:
    """Every PostgreSQL process of the cluster but this query's own, by role."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, coalesce(backend_type, ''), coalesce(application_name, '')"
            " FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        ).fetchall()
    roles: dict[int, str] = {}
    for pid, kind, application in rows:
        if kind == "walsender":
            roles[int(pid)] = "walsender"
        elif kind == "client backend":
            roles[int(pid)] = "writer_backends" if application == "pgbench" else "pgsse_backends"
        else:
            roles[int(pid)] = "postgres_other"
    return roles


def _cpu(pid: int) -> float | None:
    try:
        return sum(cpu_times(pid))
    except (OSError, IndexError, ValueError):
        return None


def _activity(pid: int) -> tuple[int, int] | None:
    """Voluntary context switches and read + write system calls of `pid` so far."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    switches = calls = 0
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            switches = int(line.split()[1])
    for line in io.splitlines():
        if line.startswith(("syscr:", "syscw:")):
            calls += int(line.split()[1])
    return switches, calls


@dataclass
class CpuWindow:
    """`start()` then `stop()` inside a phase; `shares()` the CPU of each role meanwhile."""

    url: str
    processes: dict[str, list[int]] = field(default_factory=dict)  # role -> pids, not PG's
    _roles: dict[int, str] = field(default_factory=dict)
    _before: dict[int, float] = field(default_factory=dict)
    _after: dict[int, float] = field(default_factory=dict)
    _walsender: list[tuple[int, int] | None] = field(default_factory=list)  # before, after
    _ticks: tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]]] | None = None
    _span: tuple[float, float] = (0.0, 0.0)

    def _pids(self) -> dict[int, str]:
        named = {pid: role for role, pids in self.processes.items() for pid in pids}
        return {**self._roles, **named}

    def start(self) -> None:
        self._roles = backend_roles(self.url)
        ticks = cpu_ticks()
        began = time.monotonic()
        for pid in self._pids():
            value = _cpu(pid)
            if value is not None:
                self._before[pid] = value
        self._walsender = [self._walsender_activity()]
        self._ticks = (ticks, {})
        self._span = (began, began)

    def _walsender_activity(self) -> tuple[int, int] | None:
        pids = [pid for pid, role in self._roles.items() if role == "walsender"]
        return _activity(pids[0]) if len(pids) == 1 else None

    def stop(self) -> None:
        assert self._ticks is not None
        for pid in self._before:
            value = _cpu(pid)
            if value is not None:
                self._after[pid] = value
        self._ticks = (self._ticks[0], cpu_ticks())
        self._span = (self._span[0], time.monotonic())
        self._walsender.append(self._walsender_activity())

    def shares(self) -> dict[str, Any]:
        """Each role's CPU seconds over the window divided by its length (shares of one
        core), each CPU's busy share, and `cpu1_rest`."""
        span = self._span[1] - self._span[0]
        if self._ticks is None or span <= 0:
            return {}
        seconds: dict[str, float] = {role: 0.0 for role in ON_LOAD_CPU}
        seconds.update({role: 0.0 for role in self.processes})
        pids = self._pids()
        for pid, after in self._after.items():
            seconds[pids[pid]] += after - self._before[pid]
        result: dict[str, Any] = {"window_s": round(span, 2)}
        result.update({role: round(value / span, 3) for role, value in seconds.items()})
        first, last = self._ticks
        for name, (busy, steal, total) in last.items():
            before = first.get(name)
            if before is not None and total > before[2]:
                result[f"{name}_busy"] = round((busy - before[0]) / (total - before[2]), 3)
                result[f"{name}_steal"] = round((steal - before[1]) / (total - before[2]), 3)
        sender = [*self._walsender, None, None]
        if sender[0] is not None and sender[1] is not None:
            (switches, calls), (switches_after, calls_after) = sender[0], sender[1]
            result["walsender_wakeups_per_s"] = round((switches_after - switches) / span)
            result["walsender_syscalls_per_s"] = round((calls_after - calls) / span)
        if "cpu1_busy" in result:
            on_load = ON_LOAD_CPU + tuple(r for r in self.processes if r in LOAD_CPU_PROCESSES)
            accounted = sum(result[role] for role in on_load)
            result["cpu1_rest"] = round(max(0.0, result["cpu1_busy"] - accounted), 3)
        return result


# The named processes the capture bench runs on the load CPU (the broker and pg_recvlogical
# run on CPU 0).
LOAD_CPU_PROCESSES = ("pgbench", "sse_clients")


def mean_shares(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each figure over the phases' windows (a role missing from one counts 0)."""
    if not windows:
        return {}
    keys = sorted({key for window in windows for key in window})
    return {
        key: round(sum(float(window.get(key) or 0.0) for window in windows) / len(windows), 3)
        for key in keys
    }


__all__ = ["LOAD_CPU_PROCESSES", "CpuWindow", "backend_roles", "mean_shares"]
