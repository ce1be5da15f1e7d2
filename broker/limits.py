"""Per-client limits, pure: who the client is, and how many streams each client holds.

The client is the TCP peer, unless the peer is a trusted proxy (`BROKER_TRUSTED_PROXIES`):
then `X-Forwarded-For` is read from the right, skipping trusted proxies, and the first
address no trusted proxy vouches for is the client. Entries further left were written by the
client itself and are never believed, so a client cannot pick its own bucket by sending the
header. With no trusted proxy the header is ignored altogether.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["Network", "StreamCounter", "client_address"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str:
    """The client's address for per-client limits (a normalised IP string when it parses).

    `peer` is the TCP peer's host, `forwarded_for` every `X-Forwarded-For` header value in
    order received.
    """
    if peer is None:
        return "unknown"
    peer_ip = _parse(peer)
    if peer_ip is None or not trusted or not _trusted(peer_ip, trusted):
        return str(peer_ip) if peer_ip is not None else peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    hops = [hop for hop in hops if hop]
    client = str(peer_ip)
    for hop in reversed(hops):
        hop_ip = _parse(hop)
        if hop_ip is None:
            # Written by whoever is left of the last trusted proxy: an opaque but stable key.
            return hop[:64]
        client = str(hop_ip)
        if not _trusted(hop_ip, trusted):
            return client
    return client  # every hop is a trusted proxy: the leftmost one is as far as we can see


def _parse(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[v6]:port", as some proxies write it
        text = text[1 : text.index("]")]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)


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
