"""What each route needs before its endpoint runs, declared with the route (`Guard`).

`app.py` declares every route once, through the `Guard` built from the settings; the route
carries its own checks, so nothing matches a request a second time:

- `admin` routes (stats, metrics). With `BROKER_ADMIN_PORT` they are served only on that
  port and the public port answers 404, as if they did not exist. Without an admin port,
  `BROKER_ADMIN_TOKEN` makes them require `Authorization: Bearer <admin token>` (401
  otherwise; on the admin port too when both are set). With auth on and neither set they are
  hidden (404): stats name every open session, which is not for the internet. With auth off
  and neither set they stay public.
- `public` routes (and the static mount) are not served on the admin port; `probe` routes
  are served on both ports.
- `stream` routes are public and hold one of `BROKER_MAX_STREAMS_PER_IP` slots per client
  address (the request's `client`, which uvicorn takes from `X-Forwarded-For` only behind
  `BROKER_TRUSTED_PROXIES`: `transport.server_options`) for as long as the request runs; one
  more is refused with `TooManyStreams` (429 with `Retry-After`). The stream route is served
  ahead of Starlette's middleware and exception chain (`StreamRoute`), which would otherwise
  stay on the stack for the stream's whole life.

A request whose decoded path holds a control character is refused (400) before any route is
matched (`GuardedApp`).

Every request with an `Origin` that `BROKER_CORS_ORIGINS` does not allow (and that is not the
broker's own) is logged once per origin at warning level, naming the setting (`OriginWatch`):
the browser hides the refusal from the page, which only sees "could not connect".

A route not served on a port does not match there (`Match.NONE`), so the router answers 404
for every method, exactly as for a path that does not exist. Refusals are raised as broker
errors; `answers.py` turns them into HTTP answers.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..config.settings import Settings
from ..errors import BrokerError, RequestError, TooManyStreams, Unauthorized
from ..log import Refusals
from .answers import answer
from .auth import bearer
from .limits import ClientCounter, StreamCounter

__all__ = ["Guard", "GuardedApp", "OriginWatch", "StreamRoute", "log_exposure"]

Served = Callable[[Scope], bool]
Endpoint = Callable[[Request], Awaitable[Response]]

log = structlog.get_logger(logger_name=__name__)
refusals = Refusals(log)  # log.py: at a bounded rate


class Guard:
    """Builds the app's routes with the checks the settings give them."""

    def __init__(self, settings: Settings, counter: ClientCounter | None = None) -> None:
        """`counter`: where streams per client are counted when not in this process alone
        (`limits.SharedStreamCounter`, with `--workers`)."""
        self.counter = counter
        self.admin_port = settings.admin_port
        self.admin_token = settings.admin_token
        # Without an admin port, admin routes are on the public port unless auth is on with
        # no admin token to guard them by.
        self.admin_on_public_port = settings.admin_port is None and not (
            settings.auth_secret and settings.admin_token is None
        )
        self.max_streams_per_ip = settings.max_streams_per_ip
        self.cors = bool(settings.cors_origins)

    def public(self, path: str, endpoint: Callable[..., Any], methods: list[str]) -> Route:
        return _Route(path, endpoint, methods=methods, served=self._on_public_port)

    def mount(self, path: str, app: ASGIApp) -> Mount:
        return _Mount(path, app=app, served=self._on_public_port)

    def probe(self, path: str, endpoint: Callable[..., Any]) -> Route:
        return Route(path, endpoint, methods=["GET"])

    def admin(self, path: str, endpoint: Callable[..., Any]) -> Route:
        token = [Middleware(AdminToken, token=self.admin_token)] if self.admin_token else []
        return _Route(path, endpoint, methods=["GET"], served=self._admin, middleware=token)

    def stream(self, path: str, endpoint: Endpoint) -> StreamRoute:
        """A stream route (GET and HEAD); every stream route shares one per-client count."""
        limit = self.max_streams_per_ip
        if self.counter is None and limit is not None:
            self.counter = StreamCounter(limit)
        return StreamRoute(
            path,
            endpoint,
            served=self._on_public_port,
            counter=self.counter,
            cors=self.cors,
        )

    def _on_public_port(self, scope: Scope) -> bool:
        return self.admin_port is None or _local_port(scope) != self.admin_port

    def _admin(self, scope: Scope) -> bool:
        if self.admin_port is not None:
            return _local_port(scope) == self.admin_port
        return self.admin_on_public_port


class _ServedOnly(BaseRoute):
    """A route that does not match where `served(scope)` is false."""

    served: Served

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and not self.served(scope):
            return Match.NONE, {}
        return super().matches(scope)


class _Route(_ServedOnly, Route):
    def __init__(self, path: str, endpoint: Callable[..., Any], *, served: Served, **kw: Any):
        super().__init__(path, endpoint, **kw)
        self.served = served


class _Mount(_ServedOnly, Mount):
    def __init__(self, path: str, *, app: ASGIApp, served: Served) -> None:
        super().__init__(path, app=app)
        self.served = served


class StreamRoute(_Route):
    """The stream route, which `run` serves straight from the server (`GuardedApp`), ahead of
    Starlette's middleware, exception and routing chain: every layer of it would stay on the
    stack, a coroutine frame or two each, for as long as the stream lasts. `run` does what
    the chain did for it: the per-client cap, and a refusal raised as a broker error answered
    (`answers.py`). A CORS request (`Origin`, with `BROKER_CORS_ORIGINS`) and every other
    method take the ordinary way, through the router, which has this route too."""

    def __init__(
        self,
        path: str,
        endpoint: Endpoint,
        *,
        served: Served,
        counter: ClientCounter | None,
        cors: bool,
    ) -> None:
        self.counter = counter
        middleware = [] if counter is None else [Middleware(StreamsPerClient, counter=counter)]
        super().__init__(path, endpoint, methods=["GET"], served=served, middleware=middleware)
        self.stream_endpoint = endpoint
        self.cors = cors

    def takes(self, scope: Scope) -> bool:
        """True for a request `run` serves: this route's, on a port it is served on."""
        if self.cors and _header(scope, b"origin") is not None:
            return False
        return self.matches(scope)[0] is Match.FULL

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        counter, address = self.counter, None
        try:
            try:
                if counter is not None:
                    address = _take_slot(counter, scope)
                response = await self.stream_endpoint(Request(scope, receive))
            except BrokerError as error:
                response = answer(error)
            await response(scope, receive, send)
        finally:
            if counter is not None and address is not None:
                counter.release(address)


class OriginWatch:
    """Warns, once per origin, of requests from a browser origin the CORS settings refuse.

    The browser withholds such an answer from the page (an `EventSource` reports only an
    error, and retries), while the broker serves it, replay and all, and would say nothing.
    A request without `Origin`, or from the broker's own origin (its `Host`), is not a
    cross-origin one. At most `MAX_ORIGINS` origins are remembered: past that, new ones are
    not logged (a client making up origins cannot grow the set or flood the log).
    """

    MAX_ORIGINS = 1000

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = frozenset(allowed)
        self.everyone = "*" in self.allowed
        self.warned: set[str] = set()

    def check(self, scope: Scope) -> None:
        if self.everyone:
            return
        origin = _header(scope, b"origin")
        if origin is None or origin in self.allowed or origin in self.warned:
            return
        if origin.partition("://")[2] == _header(scope, b"host"):
            return  # the broker's own page
        if len(self.warned) >= self.MAX_ORIGINS:
            return
        self.warned.add(origin)
        log.warning(
            "cors_origin_not_allowed",
            origin=origin[:200],
            path=scope.get("path"),
            allowed=sorted(self.allowed),
            hint=f"browser pages of {origin[:200]} cannot read the broker's answers"
            " (they see only 'could not connect'): add the origin to BROKER_CORS_ORIGINS"
            " (comma-separated), e.g. BROKER_CORS_ORIGINS=http://localhost:3000",
        )


class GuardedApp(Starlette):
    """Starlette, with the stream route served ahead of its middleware and exception chain
    (`StreamRoute`): an open stream keeps only its own frames on the stack. Every request's
    `Origin` is checked against the CORS settings first (`OriginWatch`)."""

    def __init__(self, stream_route: StreamRoute, origins: OriginWatch, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stream_route = stream_route
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _has_control(scope["path"]):
            # Before routing: Starlette's route regex ends in `$`, which also matches before
            # a trailing newline, so `/metrics%0A` was `/metrics` to the router while a proxy
            # rule on the exact path let it through. No route of ours has one.
            refusal = RequestError(400, "control characters in the request path")
            await answer(refusal)(scope, receive, send)
            return
        if scope["type"] == "http":
            self.origins.check(scope)
        if scope["type"] == "http" and self.stream_route.takes(scope):
            scope["app"] = self
            await self.stream_route.run(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class AdminToken:
    """Per-route middleware: `Authorization: Bearer <BROKER_ADMIN_TOKEN>`, else 401."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            given = bearer(_header(scope, b"authorization"))
        except Unauthorized:
            given = None
        if given is None or not hmac.compare_digest(given.encode(), self.token):
            refusals.info("admin_refused", "admin token required", path=scope.get("path"))
            raise Unauthorized("admin token required: Authorization: Bearer <BROKER_ADMIN_TOKEN>")
        await self.app(scope, receive, send)


class StreamsPerClient:
    """Per-route middleware: one of the client address's stream slots, held while the request
    runs, whatever ends it; none left raises `TooManyStreams`."""

    def __init__(self, app: ASGIApp, counter: ClientCounter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        address = _take_slot(self.counter, scope)
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.release(address)


def _take_slot(counter: ClientCounter, scope: Scope) -> str:
    """Take one of the request's client address's stream slots and return the address (to
    release it by); none left raises `TooManyStreams`."""
    client = scope.get("client")
    address = str(client[0]) if client else "unknown"
    if not counter.acquire(address):
        refusals.info("stream_refused", "per_client_limit", client=address)
        raise TooManyStreams(f"too many streams from this address (at most {counter.limit})")
    return address


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


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _has_control(path: str) -> bool:
    """True when the decoded path holds a C0 control character or DEL."""
    return _CONTROL.search(path) is not None


def _local_port(scope: Scope) -> int | None:
    server = scope.get("server")
    return None if not server else server[1]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
