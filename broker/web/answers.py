"""Errors as HTTP answers: the one place a broker error gets its status, headers and body.

Every refusal the API makes has the body `{"success": false, "error": <message>}`. `answer`
builds it for a `BrokerError` or a Starlette `HTTPException` (an unknown path, a wrong
method), with `events.error_body`, the body the server's protocol also writes for the refusals
it makes on the socket before there is a request. `HANDLERS` are the app's exception handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import (
    BrokerError,
    Forbidden,
    RequestError,
    TooManyStreams,
    Unauthorized,
    Unavailable,
)
from ..events import error_body

__all__ = ["HANDLERS", "answer", "status_of"]

_STATUS: Mapping[type[BrokerError], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    TooManyStreams: 429,
    Unavailable: 503,
}
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pgsse"'}


def status_of(error: BrokerError) -> int:
    """The HTTP status that answers `error`; 500 for an error no request should meet."""
    if isinstance(error, RequestError):
        return error.status
    for kind in type(error).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return 500


def answer(error: BrokerError | HTTPException) -> Response:
    """The response to `error`: its status, the error body, and the headers it calls for
    (`Retry-After` when it says when to retry, the bearer challenge on a 401)."""
    if isinstance(error, HTTPException):
        status, message = error.status_code, error.detail
        headers = dict(error.headers or {})
    else:
        status, message, headers = status_of(error), str(error), {}
        retry_after: int | None = getattr(error, "retry_after", None)
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if isinstance(error, Unauthorized):
            headers.update(_CHALLENGE)
    return Response(error_body(message), status, headers, media_type="application/json")


async def _handle(request: Request, error: Exception) -> Response:
    if not isinstance(error, BrokerError | HTTPException):  # registered for these only
        raise error
    return answer(error)


Handler = Callable[[Request, Exception], Awaitable[Response]]
HANDLERS: Mapping[type[Exception], Handler] = {
    kind: _handle for kind in (*_STATUS, RequestError, HTTPException)
}
