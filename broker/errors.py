"""The broker's own exceptions: what went wrong, never how HTTP says it.

Every exception the broker raises on purpose, wherever it is defined (the module in brackets
when not here):

    BrokerError
     ├── ConfigError          a setting is invalid; start-up stops with its one-line message
     ├── RequestError         a request whose input the API refuses, with the status the
     │                        HTTP checks chose (400, 404, 413, 415)
     ├── Unauthorized         no valid token
     ├── Forbidden            a valid token that does not allow this
     ├── TooManyStreams       this client address has its most streams open (`retry_after`)
     ├── BusDown              Redis did not answer (feeds/bus.py)
     ├── SlotError            the WAL capture's replication slot cannot be read (slots.py)
     │    ├── SlotMissing     no such slot: `pgsse migrate` with BROKER_CAPTURE=wal makes it
     │    ├── SlotBusy        another session reads it
     │    └── SlotInvalidated PostgreSQL dropped the WAL it needed (max_slot_wal_keep_size)
     └── Unavailable          the broker cannot serve this now (`retry_after`)
          ├── AtCapacity      every stream slot is taken (BROKER_MAX_CONNECTIONS)
          └── DatabaseUnavailable  PostgreSQL unreachable or failing (store.py)

    ValueError
     └── BadSignature         a payload not signed with the database's key (signing.py); a
                              ValueError, as a malformed payload is, since both are dropped
                              alike

`BrokerError` itself is raised, with its message, where the embedded PostgreSQL cannot be set
up (embedded/). Library errors (psycopg, redis, starlette) are translated where they cross
into broker code. The core (hub, store, feeds) raises these with no notion of HTTP;
`web/answers.py`, at the HTTP edge, is the one place that gives each its status, headers and
`{"success": false, ...}` body.
"""


class BrokerError(Exception):
    """Base class of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """A setting has an invalid value. The message names the setting."""


class RequestError(BrokerError):
    """Input the API refuses. Raised only by the HTTP layer's checks, which choose `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Unauthorized(BrokerError):
    """No token, or one that is malformed, expired or not signed by a configured secret."""


class Forbidden(BrokerError):
    """A valid token whose grant does not cover the request."""


class TooManyStreams(BrokerError):
    """The client address already has its most concurrent streams open."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(BrokerError):
    """The broker cannot serve the request now; the client should retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AtCapacity(Unavailable):
    """Every stream slot of this process is taken."""
