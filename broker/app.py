"""The HTTP API: routes, lifespan, CORS, and the one place errors become HTTP answers.

`create_app(settings)` builds the application and does nothing else; the broker starts in
the lifespan. Routes never reach PostgreSQL themselves: they call the `Broker`'s store and hub.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from .auth import Authenticator, authenticate
from .config import Settings
from .errors import RequestError
from .guard import Guard
from .metrics import create_registry, render
from .service import Broker
from .validation import check_id, parse_history, parse_last_event_id, parse_new_message

__all__ = ["MAX_BODY_BYTES", "create_app"]

MAX_BODY_BYTES = 1024 * 1024
STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Broker.running(settings) as broker:
            app.state.broker = broker
            app.state.metrics = create_registry(broker)
            yield

    routes = [
        Route("/api/sse/messages", stream_messages, methods=["GET"]),
        Route("/api/sse/stats", stats, methods=["GET"]),
        Route("/api/messages", post_message, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
    ]
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
    middleware.append(Middleware(Guard, settings=settings))  # admin surface, per-client cap
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={RequestError: request_error, HTTPException: http_error},
    )
    app.state.auth = Authenticator(settings.auth_secret)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def failure(status: int, error: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"success": False, "error": error}, status_code=status, headers=headers)


async def request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return failure(exc.status, exc.message, exc.headers or None)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return failure(exc.status_code, exc.detail, dict(exc.headers or {}))


async def stream_messages(request: Request) -> Response:
    broker = _broker(request)
    grant = authenticate(request, query=True)
    params = request.query_params
    session_id = check_id("sessionId", params.get("sessionId"))
    robot_id = check_id("robotId", params.get("robotId"))
    grant.check_read(session_id, robot_id)
    last_event_id = parse_last_event_id(
        request.headers.get("last-event-id", params.get("lastEventId"))
    )
    history = parse_history(params.get("history"))
    return broker.open_stream(session_id, robot_id, last_event_id=last_event_id, history=history)


async def stats(request: Request) -> Response:
    broker = _broker(request)
    listener = broker.listener
    counters = broker.hub.counters
    data: dict[str, Any] = {
        "totalConnections": len(broker.hub),
        "channels": broker.hub.channels(),
        "listener": {
            "connected": listener.connected,
            "reconnects": listener.reconnects,
            "notifications": listener.notifications,
            "backfilled": listener.backfilled,
        },
        "counters": {
            "messagesRouted": counters.messages_routed,
            "eventsDelivered": counters.events_delivered,
            "slowConsumerDisconnects": counters.slow_consumer_disconnects,
            "rejectedConnections": counters.rejected_connections,
            "replayedEvents": counters.replayed_events,
        },
        "uptimeSeconds": round(time.time() - broker.started_at, 3),
        "tasks": len(asyncio.all_tasks()),
    }
    return JSONResponse({"success": True, "data": data})


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
    if not _broker(request).listener.connected:
        return failure(503, "listener not connected", {"Retry-After": "1"})
    return JSONResponse({"success": True, "data": {"status": "ready"}})


async def metrics(request: Request) -> Response:
    body, content_type = render(request.app.state.metrics, request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


async def index(request: Request) -> Response:
    page = STATIC / "index.html"
    if not page.is_file():
        return failure(404, "no demo page installed")
    return FileResponse(page, media_type="text/html")
