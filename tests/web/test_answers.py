"""`broker.web.answers`: each broker error as its HTTP answer, in process (no server)."""

from __future__ import annotations

import json

import pytest
from starlette.exceptions import HTTPException

from broker.errors import (
    AtCapacity,
    BrokerError,
    ConfigError,
    Forbidden,
    RequestError,
    TooManyStreams,
    Unauthorized,
    Unavailable,
)
from broker.events import error_body
from broker.server.protocol import RESPONSE_408
from broker.store import DatabaseUnavailable
from broker.web.answers import HANDLERS, answer


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (RequestError(415, "Content-Type must be application/json"), 415, {}),
        (Unauthorized("token expired"), 401, {"www-authenticate": 'Bearer realm="pgsse"'}),
        (Forbidden("token does not allow this sessionId"), 403, {}),
        (TooManyStreams("too many streams", retry_after=5), 429, {"retry-after": "5"}),
        (AtCapacity("too many connections: retry later"), 503, {"retry-after": "1"}),
        (DatabaseUnavailable(OSError()), 503, {"retry-after": "2"}),
        (Unavailable("listener not connected"), 503, {"retry-after": "1"}),
        (HTTPException(405, headers={"Allow": "GET"}), 405, {"allow": "GET"}),
    ],
)
def test_each_error_is_one_answer_with_its_status_headers_and_body(
    error: BrokerError | HTTPException, status: int, headers: dict[str, str]
) -> None:
    response = answer(error)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    for name, value in headers.items():
        assert response.headers[name] == value
    # And no other of these: a client retries on Retry-After, re-authenticates on a challenge.
    for name in ("retry-after", "www-authenticate", "allow"):
        assert (name in response.headers) == (name in headers), name
    message = error.detail if isinstance(error, HTTPException) else str(error)
    assert json.loads(response.body) == {"success": False, "error": message}


def test_an_error_no_request_should_meet_is_a_500_left_unhandled() -> None:
    assert answer(ConfigError("invalid BROKER_PORT")).status_code == 500
    assert ConfigError not in HANDLERS and BrokerError not in HANDLERS


def test_the_handlers_cover_every_error_a_route_raises() -> None:
    for kind in (RequestError, Unauthorized, Forbidden, TooManyStreams, Unavailable):
        assert kind in HANDLERS
    assert HTTPException in HANDLERS


def test_the_transport_refusals_carry_the_same_body() -> None:
    head, _, body = RESPONSE_408.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"content-type: application/json" in head
    assert body == error_body("request body not received in time")
    assert json.loads(body) == {"success": False, "error": "request body not received in time"}
