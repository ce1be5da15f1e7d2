"""The broker's own exceptions.

    BrokerError
     ├── ConfigError        a setting is invalid; start-up stops with its one-line message
     └── RequestError       a client sent something the API refuses (status + message)
          ├── Unauthorized  no valid token (401 + WWW-Authenticate)
          ├── Forbidden     a valid token that does not allow this (403)
          ├── TooManyStreams  this client address has its most streams open (429 + Retry-After)
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

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


class Unauthorized(RequestError):
    """No token, or one that is malformed, expired or not signed by a configured secret."""

    def __init__(self, message: str) -> None:
        super().__init__(401, message, {"WWW-Authenticate": 'Bearer realm="pgsse"'})


class Forbidden(RequestError):
    """A valid token whose grant does not cover the request."""

    def __init__(self, message: str) -> None:
        super().__init__(403, message)


class TooManyStreams(RequestError):
    """The client address already has its most concurrent streams open."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(429, message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class Unavailable(RequestError):
    """The server is at capacity or not ready; the client should retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(503, message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after
