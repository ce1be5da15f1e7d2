"""The database's key: what proves a notification or a bus entry came from pgsse's trigger.

Any role that can connect may `NOTIFY pgsse_messages, '...'`, and anyone who can write to
Redis may `XADD` to the bus. So every payload the broker acts on is signed:
`sql/002_notify.sql` makes a random 64-byte key once, in table `pgsse_key` that only its owner
reads, and the trigger (SECURITY DEFINER) prefixes each payload with its HMAC-SHA256 as 64 hex
digits. The broker loads the key when its listener (or relay, or bus reader) connects and
drops whatever does not verify. The relay forwards the trigger's signed payload to the bus as
is and signs the rows it reads from the table itself, so a bus entry carries the same proof.

Why a signature rather than checking each notification against the table: the check would
cost a query per wake-up batch on the listener's connection (a round trip in the hot path of
every row, and no help against a forged row whose id has not committed yet), while verifying
is one HMAC over the payload in C: 1.1 us for a 300-byte row, measured (docs/security.md).

`database` names the key (not secret: a digest of it), so an entry says which database it
belongs to and a broker refuses entries of another deployment that shares its Redis stream.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

__all__ = ["SIGNATURE_CHARS", "BadSignature", "RowKey", "refusal_reason"]

SIGNATURE_CHARS = 64  # hex digits of an HMAC-SHA256


class BadSignature(ValueError):
    """A payload without a valid signature of this database's key."""


@dataclass(frozen=True)
class RowKey:
    """The key of `pgsse_key`: signs and verifies payloads."""

    secret: bytes = field(repr=False)
    database: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.secret) != 64:
            raise ValueError("pgsse_key must hold 64 bytes")
        digest = hashlib.sha256(b"pgsse database " + self.secret).hexdigest()[:16]
        object.__setattr__(self, "database", digest)

    def sign(self, payload: bytes) -> bytes:
        """`payload` prefixed with its signature, as the trigger writes it."""
        return hmac.digest(self.secret, payload, "sha256").hex().encode() + payload

    def verify(self, signed: str | bytes) -> bytes:
        """The payload of `signed` (what `sign` or the trigger wrote). Raises `BadSignature`."""
        data = signed.encode() if isinstance(signed, str) else signed
        signature, payload = data[:SIGNATURE_CHARS], data[SIGNATURE_CHARS:]
        expected = hmac.digest(self.secret, payload, "sha256").hex().encode()
        if not hmac.compare_digest(signature, expected):
            raise BadSignature("payload not signed with this database's key")
        return payload


def refusal_reason(exc: ValueError) -> str:
    """Why a payload was refused, as a fixed text (`log.Refusals` bounds lines per reason)."""
    return "not signed with this database's key" if isinstance(exc, BadSignature) else "malformed"
