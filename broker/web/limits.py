"""Per-client limits: how many streams each client address holds.

The client address is the request's `client` as uvicorn sets it: the TCP peer, or behind a
trusted proxy the address `X-Forwarded-For` vouches for (`transport.server_options`).

`BROKER_MAX_STREAMS_PER_IP` holds for the port, not for each process: with `--workers N`
the workers count in one table in shared memory (`SharedStreamCounter`), made by the parent
before it forks them, so one address holds at most the cap over all of them (it held N times
the cap when each worker counted alone). One process counts in a dict (`StreamCounter`).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import secrets
import tempfile
from typing import Protocol

import structlog

__all__ = ["ClientCounter", "SharedStreamCounter", "StreamCounter"]

log = structlog.get_logger(logger_name=__name__)


class ClientCounter(Protocol):
    limit: int

    def acquire(self, client: str) -> bool: ...

    def release(self, client: str) -> None: ...


class StreamCounter:
    """Open streams per client address, at most `limit` each. No I/O; loop thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> bool:
        """Count one more stream for `client`; False (and nothing counted) at the limit."""
        count = self._open.get(client, 0)
        if count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self._open.get(client, 0) - 1
        if count > 0:
            self._open[client] = count
        else:
            self._open.pop(client, None)

    def __len__(self) -> int:
        """Open streams counted, over every client."""
        return sum(self._open.values())

    def clients(self) -> int:
        return len(self._open)


class SharedStreamCounter:
    """Open streams per client address over every worker of a port, at most `limit` each.

    A table in anonymous shared memory (inherited by `fork`): per entry, a 64-bit keyed hash
    of the address (the key is random per start, so no client can aim collisions) and one
    stream count per worker. A worker counts only in its own column (`use_column`), so when a
    worker dies its column is zeroed by the one forked in its place: the streams it held died
    with it. An address lives in the `WINDOW` entries from its hash's position; an entry
    whose counts are all zero is free. Each acquire or release scans that window under a
    POSIX record lock (`lockf`: held per process, and released by the kernel if the holder
    dies), a few microseconds. The table has twice as many entries as streams can be open
    (`entries`), so a full window is, with a keyed hash, not a practical event; should it
    happen, the stream is let through uncounted and `stream_cap_table_full` logged.
    """

    WINDOW = 64

    def __init__(self, limit: int, workers: int, entries: int) -> None:
        self.limit = limit
        self.workers = workers
        self.entries = max(entries, self.WINDOW)
        self._hash_key = secrets.token_bytes(16)
        self._keys_bytes = 8 * self.entries
        self._memory = mmap.mmap(-1, self._keys_bytes + 4 * workers * self.entries)
        self._keys = memoryview(self._memory)[: self._keys_bytes].cast("Q")
        self._counts = memoryview(self._memory)[self._keys_bytes :].cast("I")
        # Only for its lock; open as long as the counter is.
        self._lock = tempfile.TemporaryFile(prefix="pgsse-streams-")  # noqa: SIM115
        self._column = 0

    def close(self) -> None:
        """Free the table and its lock file (in this process)."""
        self._keys.release()
        self._counts.release()
        self._memory.close()
        self._lock.close()

    def use_column(self, worker: int) -> None:
        """In a worker just forked: count in column `worker`, which a dead predecessor may
        have left counts in."""
        self._column = worker
        with self._locked():
            for entry in range(self.entries):
                self._counts[entry * self.workers + worker] = 0

    def acquire(self, client: str) -> bool:
        """Count one more stream for `client`; False (and nothing counted) at the limit."""
        key = self._key(client)
        with self._locked():
            entry = self._find(key, claim=True)
            if entry is None:
                log.warning("stream_cap_table_full", entries=self.entries)
                return True
            base = entry * self.workers
            if sum(self._counts[base : base + self.workers]) >= self.limit:
                return False
            self._keys[entry] = key
            self._counts[base + self._column] += 1
            return True

    def release(self, client: str) -> None:
        key = self._key(client)
        with self._locked():
            entry = self._find(key, claim=False)
            if entry is not None and self._counts[entry * self.workers + self._column]:
                self._counts[entry * self.workers + self._column] -= 1

    def _key(self, client: str) -> int:
        digest = hashlib.blake2b(client.encode(), digest_size=8, key=self._hash_key).digest()
        return int.from_bytes(digest, "little") | 1  # never 0: an entry never used

    def _find(self, key: int, claim: bool) -> int | None:
        """The entry of `key` in its window; with `claim`, else its first free entry."""
        start = key % self.entries
        free = None
        for step in range(self.WINDOW):
            entry = (start + step) % self.entries
            if self._keys[entry] == key and self._held(entry):
                return entry
            if free is None and not self._held(entry):
                free = entry
        return free if claim else None

    def _held(self, entry: int) -> bool:
        base = entry * self.workers
        return any(self._counts[base : base + self.workers])

    def _locked(self) -> _FileLock:
        return _FileLock(self._lock.fileno())


class _FileLock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)
