"""The relay's lease: a key in Redis that the relay renews while it holds the role.

A live relay proves it with the lease: `token` under the bus's `lease_key`, set for `LEASE_MS`
when it takes the role (`Bus.lease`) and renewed by it (`relay.RENEW_SECONDS`) on a Redis
connection of its own for as long as the role lasts. Every broker reads the lease's holder
(`Bus.lease_holder`) at its campaign polls: a lease gone means a stopped relay (the relay's
docstring says what follows). Renewal is conditional, so a relay frozen past its lease never
takes it back from the broker that took over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import redis.asyncio

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["LEASE_MS", "Lease"]

LEASE_MS = 3_000  # the relay's lease (`Bus.lease`) lapses this long after its renewal

# Extend the lease only while it is still ours: a relay frozen past its lease must not take it
# back from the broker that took over.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class Lease:
    """The relay's lease on its own connection (`Bus.lease`)."""

    def __init__(self, bus: Bus, client: redis.asyncio.Redis, token: str) -> None:
        self._bus = bus
        self._client = client
        self._renew = client.register_script(_RENEW)
        self.token = token

    async def renew(self, take: bool = False) -> bool:
        """Extend the lease if it is still this token's (False if it expired or passed on);
        with `take`, set it whoever held it."""
        key = self._bus.lease_key
        if take:
            return bool(await self._bus.call(self._client.set(key, self.token, px=LEASE_MS)))
        renew = self._renew(keys=[key], args=[self.token, LEASE_MS], client=self._client)
        return bool(await self._bus.call(renew))
