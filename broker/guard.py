"""The edge of the app: requests refused before they reach a route.

`Guard` is an ASGI middleware that decides by the route a request would reach (asked of the
router itself, so `/api/sse/stats%0A` or a trailing slash cannot slip past a string compare):

- Admin paths (`ADMIN_PATHS`: stats and metrics). With `BROKER_ADMIN_PORT` they are served
  only on that port and the public port answers 404, as if they did not exist; the admin port
  serves nothing else but the probes. Without an admin port, `BROKER_ADMIN_TOKEN` makes them
  require `Authorization: Bearer <admin token>` (401 otherwise). With auth on and neither set
  they are hidden (404): stats name every open session, which is not for the internet. With
  auth off and neither set they stay public, as before this module existed.
- Streams: at most `BROKER_MAX_STREAMS_PER_IP` concurrent streams per client address (the
  request's `client`, which uvicorn takes from `X-Forwarded-For` only behind
  `BROKER_TRUSTED_PROXIES`: `transport.server_options`); one more is answered 429 with
  `Retry-After`. The slot is held for as long as the request runs, whatever ends it.

Refusals use the API's error body, `{"success": false, "error": ...}`.
"""

from __future__ import annotations

import hmac

import structlog
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .answers import answer
from .auth import bearer
from .config import Settings
from .errors import BrokerError, RequestError, TooManyStreams, Unauthorized
from .limits import StreamCounter

__all__ = ["ADMIN_PATHS", "PROBE_PATHS", "STREAM_PATH", "Guard", "log_exposure"]

ADMIN_PATHS = frozenset({"/api/sse/stats", "/metrics"})
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
STREAM_PATH = "/api/sse/messages"
_WATCHED = ADMIN_PATHS | PROBE_PATHS | {STREAM_PATH}
_READS = ("GET", "HEAD")  # Starlette answers HEAD with the GET endpoint: a stream too

log = structlog.get_logger(logger_name="broker.guard")


class Guard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.admin_port = settings.admin_port
        self.admin_token = settings.admin_token
        # Admin paths on the public port: hidden with an admin port, or with auth on and no
        # admin token to guard them by.
        self.hide_admin = settings.admin_port is not None or (
            bool(settings.auth_secret) and settings.admin_token is None
        )
        self.streams = (
            None
            if settings.max_streams_per_ip is None
            else StreamCounter(settings.max_streams_per_ip)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route_path(scope)
        refusal: BrokerError | None = None
        if self.admin_port is not None and _local_port(scope) == self.admin_port:
            if route in ADMIN_PATHS:
                refusal = self._check_admin_token(scope)
            elif route not in PROBE_PATHS:
                refusal = RequestError(404, "Not Found")
        elif route in ADMIN_PATHS:
            if self.hide_admin:
                refusal = RequestError(404, "Not Found")
            else:
                refusal = self._check_admin_token(scope)
        elif route == STREAM_PATH and self.streams is not None and scope["method"] in _READS:
            await self._stream(scope, receive, send, self.streams)
            return
        if refusal is not None:
            await _refuse(refusal, scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_admin_token(self, scope: Scope) -> BrokerError | None:
        if self.admin_token is None:
            return None
        try:
            given = bearer(_header(scope, b"authorization"))
        except Unauthorized:
            given = None
        if given is not None and hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return None
        log.info("admin_refused", path=scope.get("path"))
        return Unauthorized("admin token required: Authorization: Bearer <BROKER_ADMIN_TOKEN>")

    async def _stream(
        self, scope: Scope, receive: Receive, send: Send, streams: StreamCounter
    ) -> None:
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        if not streams.acquire(address):
            log.info("stream_refused", reason="per_client_limit", client=address)
            limit = streams.limit
            refusal = TooManyStreams(f"too many streams from this address (at most {limit})")
            await _refuse(refusal, scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            streams.release(address)


def log_exposure(settings: Settings) -> None:
    """Warn at start-up about what the configuration leaves open."""
    if not settings.auth_secret:
        log.warning(
            "auth_disabled",
            hint="anyone who knows a sessionId can read it and anyone can publish:"
            " set BROKER_AUTH_SECRET before exposing the broker",
            admin="public" if settings.admin_port is None and not settings.admin_token else None,
        )
    elif settings.admin_port is None and settings.admin_token is None:
        log.warning(
            "admin_hidden",
            hint="/api/sse/stats and /metrics answer 404: set BROKER_ADMIN_PORT or"
            " BROKER_ADMIN_TOKEN to reach them",
        )


def _route_path(scope: Scope) -> str | None:
    """The path template of the watched route the router would send `scope` to, if any."""
    routes = getattr(scope.get("app"), "routes", ())
    for route in routes:
        if isinstance(route, Route) and route.path in _WATCHED:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return route.path
    return None


def _local_port(scope: Scope) -> int | None:
    server = scope.get("server")
    return None if not server else server[1]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _refuse(error: BrokerError, scope: Scope, receive: Receive, send: Send) -> None:
    await answer(error)(scope, receive, send)
