"""The broker's own exceptions.

    BrokerError
     ├── ConfigError        a setting is invalid; start-up stops with its one-line message
     └── RequestError       a client sent something the API refuses (status + message)
          └── Unavailable   the server cannot take the request now (503 + Retry-After)

Library errors (psycopg, starlette) are translated where they cross into broker code; the HTTP
layer maps every `RequestError` to a `{"success": false, "error": ...}` answer in one place.
"""


class BrokerError(Exception):
    """Base class of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """A setting has an invalid value. The message names the setting."""


class RequestError(BrokerError):
    """A request the API refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Unavailable(RequestError):
    """The server is at capacity or not ready; the client should retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(503, message)
        self.retry_after = retry_after
