"""Per-client limits, pure: how many streams each client address holds.

The client address is the request's `client` as uvicorn sets it: the TCP peer, or behind a
trusted proxy the address `X-Forwarded-For` vouches for (`transport.server_options`).
"""

from __future__ import annotations

__all__ = ["StreamCounter"]


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
