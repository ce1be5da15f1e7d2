"""System calls a process makes during a block, counted by `strace -c` (if installed).

CPU time per row moves with whatever else runs on the machine; the number of system calls per
row does not: it shows re-arming (`epoll_ctl`), `getpid` from `asyncio.get_running_loop()` on
3.11, and how many reads and writes a row takes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ATTACH_SECONDS = 1.0  # strace reports nothing of its attaching; give it this long


@contextmanager
def counted(pid: int) -> Iterator[dict[str, int]]:
    """Within the block, `pid`'s system calls by name (all threads); empty without strace."""
    counts: dict[str, int] = {}
    strace = shutil.which("strace")
    if strace is None:
        yield counts
        return
    with tempfile.TemporaryDirectory(prefix="pgsse-strace-") as tmp:
        out = Path(tmp) / "counts.txt"
        tracer = subprocess.Popen(
            [strace, "-c", "-f", "-o", str(out), "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(ATTACH_SECONDS)
        try:
            yield counts
        finally:
            tracer.terminate()
            tracer.wait(30)
            if out.exists():
                counts.update(parse(out.read_text()))


def parse(table: str) -> dict[str, int]:
    """`strace -c`'s table: calls by system call name (the `total` line left out)."""
    counts: dict[str, int] = {}
    for line in table.splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def per_row(counts: dict[str, int], rows: int, least: float = 0.05) -> dict[str, float]:
    """Calls per row, the total first, leaving out calls rarer than `least` per row."""
    if not counts or not rows:
        return {}
    result = {"total": round(sum(counts.values()) / rows, 2)}
    for name, calls in sorted(counts.items(), key=lambda item: -item[1]):
        if calls / rows >= least:
            result[name] = round(calls / rows, 2)
    return result
