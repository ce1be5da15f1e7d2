"""The HTTP API: routes, lifespan, CORS; errors become HTTP answers in `answers.py`.

`create_app(settings)` builds the application and does nothing else; the broker starts in
the lifespan. Routes never reach PostgreSQL themselves: they call the `Broker`'s store and hub.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from os import PathLike
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.staticfiles import StaticFiles

from ..config.settings import Settings
from ..errors import Forbidden, RequestError, Unavailable
from ..service import Broker
from .answers import HANDLERS
from .auth import OPEN, Authenticator, Grant, authenticate
from .guard import Guard, GuardedApp, OriginWatch
from .limits import ClientCounter
from .metrics import create_registry, render
from .stats import snapshot
from .stream import EventStreamHead, EventStreamResponse
from .validation import (
    check_feed_query,
    check_id,
    check_session_ids,
    parse_history,
    parse_last_event_id,
    parse_new_message,
)

__all__ = ["MAX_BODY_BYTES", "create_app"]

MAX_BODY_BYTES = 1024 * 1024
# The demo page loads its script, style and API from its own origin only, and may not be
# framed (clickjacking); the icon is a data: URL. Every answer also carries
# X-Content-Type-Options: nosniff (transport.server_options).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none';"
    " base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}
TYPESCRIPT = "application/typescript; charset=utf-8"
PACKAGE = Path(__file__).parents[1]  # broker/
STATIC = PACKAGE / "static"
# The browser client's modules are the npm package's own files (client/src), served beside the
# demo page as /static/sse-client.js etc.; a wheel has them in broker/static (force-include).
CLIENT = PACKAGE.parent / "client" / "src"


def create_app(settings: Settings, counter: ClientCounter | None = None) -> Starlette:
    """The app; `counter` counts streams per client when workers share the port."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Broker.running(settings) as broker:
            app.state.broker = broker
            app.state.metrics = create_registry(broker)
            yield

    # Each route once, with its checks (guard.py): where it is served, admin token, stream cap.
    guard = Guard(settings, counter)
    stream_route = guard.stream("/api/sse/messages", stream_messages)
    routes: list[BaseRoute] = [
        stream_route,
        guard.admin("/api/sse/stats", stats),
        # After the two above (`stats` is no feed's name: config/feeds.py reserves it).
        guard.stream("/api/sse/{feed}", stream_feed),
        guard.public("/api/messages", post_message, methods=["POST"]),
        guard.probe("/healthz", healthz),
        guard.probe("/readyz", readyz),
        guard.admin("/metrics", metrics),
        guard.public("/", index, methods=["GET"]),
    ]
    if STATIC.is_dir():
        static = _StaticFiles(directory=STATIC)
        if CLIENT.is_dir():
            static.all_directories.append(CLIENT)  # looked up in order, after STATIC
        routes.append(guard.mount("/static", static))
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Content-Type", "Last-Event-ID", "Authorization"],
                max_age=600,
            )
        )
    app = GuardedApp(
        stream_route,
        OriginWatch(settings.cors_origins),
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=dict(HANDLERS),  # answers.py: errors become HTTP answers there
    )
    # No redirects: Starlette's trailing-slash redirect builds its Location from the request's
    # Host and query string (a token included). An unknown path is 404.
    app.router.redirect_slashes = False
    app.state.auth = Authenticator(settings.auth_secret)
    return app


def _broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


async def stream_messages(request: Request) -> Response:
    broker = _broker(request)
    grant = authenticate(request, query=True)
    params = request.query_params
    sessions = check_session_ids(params.getlist("sessionId"))
    robot_id = check_id("robotId", params.get("robotId"))
    for session_id in sessions or (None,):  # each session must be covered by the token
        grant.check_read(session_id, robot_id)
    last_event_id = parse_last_event_id(
        request.headers.get("last-event-id", params.get("lastEventId"))
    )
    history = parse_history(params.get("history"))
    if request.method == "HEAD":
        # The status and headers a GET would get (503 when full); nothing is held.
        broker.feeds.admit()
        broker.hub.unsubscribe(broker.hub.subscribe(sessions, robot_id))
        return EventStreamHead()
    subscriber, replay = broker.open_stream(
        sessions, robot_id, last_event_id=last_event_id, history=history
    )
    return EventStreamResponse(
        broker.hub,
        subscriber,
        replay,
        listening=broker.started,
        retry_ms=broker.settings.retry_ms,
        valid_until=grant.valid_until,
    )


async def stream_feed(request: Request) -> Response:
    """`GET /api/sse/<feed>` of a generic feed (the messages feed has `stream_messages`):
    query parameters are the feed's key and filter columns (docs/feeds.md)."""
    broker = _broker(request)
    name = request.path_params["feed"]
    feed = broker.feeds.get(name)
    if feed is None:
        raise RequestError(404, "no such feed")
    grant = authenticate(request, query=True)
    spec = feed.feed
    params = request.query_params
    keys, filters = check_feed_query(spec.key, spec.filters, params.multi_items())
    refusal = authorize_feed(grant, name, keys)
    if refusal is not None:
        raise Forbidden(refusal)
    last_event_id = parse_last_event_id(
        request.headers.get("last-event-id", params.get("lastEventId"))
    )
    history = parse_history(params.get("history"))
    if request.method == "HEAD":
        broker.feeds.admit()  # the status a GET would get (503 when full); nothing held
        return EventStreamHead()
    subscriber, replay = broker.open_feed_stream(
        feed, keys, filters, last_event_id=last_event_id, history=history
    )
    return EventStreamResponse(
        feed,
        subscriber,
        replay,
        listening=broker.started,
        retry_ms=broker.settings.retry_ms,
        valid_until=grant.valid_until,
        connected=feed.connected(subscriber, broker.settings.retry_ms),
    )


def authorize_feed(grant: Grant, feed: str, keys: tuple[str, ...] | None) -> str | None:
    """Why `grant` may not stream `feed` for `keys` (None: the global stream), or None if it
    may: the one place a feed stream's token is checked. Without `BROKER_AUTH_SECRET` every
    feed is open; a token's `sessions`/`robots` scope the messages feed only, so until tokens
    carry a `feeds` claim a token allows no other feed."""
    if grant is OPEN:
        return None
    return "token does not allow this feed"


async def stats(request: Request) -> Response:
    return JSONResponse({"success": True, "data": snapshot(_broker(request)).as_json()})


async def post_message(request: Request) -> Response:
    grant = authenticate(request)
    grant.check_publish()  # 401/403 before the body is read
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "Content-Type must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(413, f"body must be at most {MAX_BODY_BYTES} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(413, f"body must be at most {MAX_BODY_BYTES} bytes")
    except ClientDisconnect:
        return Response(status_code=400)
    new = parse_new_message(bytes(body))
    grant.check_write(new.session_id, new.robot_id)
    message = await _broker(request).store.insert(
        new.session_id, new.content, new.robot_id, new.is_from_bot, new.is_human, new.intent
    )
    return JSONResponse({"success": True, "data": message.as_json()}, status_code=201)


async def healthz(request: Request) -> Response:
    return JSONResponse({"success": True, "data": {"status": "ok"}})


async def readyz(request: Request) -> Response:
    if not _broker(request).ready:
        raise Unavailable("listener not connected", retry_after=1)
    return JSONResponse({"success": True, "data": {"status": "ready"}})


async def metrics(request: Request) -> Response:
    body, content_type = render(request.app.state.metrics, request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


async def index(request: Request) -> Response:
    page = STATIC / "index.html"
    if not page.is_file():
        raise RequestError(404, "no demo page installed")
    return FileResponse(page, media_type="text/html", headers=PAGE_HEADERS)


class _StaticFiles(StaticFiles):
    """Starlette's static files, with the client package's type declarations (`.d.ts`)
    served as TypeScript: `mimetypes` takes `.ts` for an MPEG transport stream."""

    def file_response(self, full_path: PathLike[str] | str, *args: Any, **kw: Any) -> Response:
        response = super().file_response(full_path, *args, **kw)
        if str(full_path).endswith(".ts"):
            response.headers["content-type"] = TYPESCRIPT
        return response
