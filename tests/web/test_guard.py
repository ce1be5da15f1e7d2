"""broker.web.guard in process: routes declared with their checks, under a small Starlette app
driven through httpx's ASGI transport (the URL's port is the request's local port). The end
to end cases, over real sockets, are in test_limits, test_auth and test_attacks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.config.settings import Settings
from broker.errors import RequestError
from broker.web.answers import HANDLERS
from broker.web.guard import AdminToken, Guard, GuardedApp, OriginWatch, StreamsPerClient

PUBLIC, ADMIN = 5001, 9100
TOKEN = "admin-token-0123456789"
SECRET = "s" * 32


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


Endpoint = Callable[[Request], Awaitable[Response]]


def app_for(
    settings: Settings, stream: Endpoint = ok, middleware: Sequence[Middleware] = ()
) -> Starlette:
    guard = Guard(settings)
    stream_route = guard.stream("/stream", stream)
    return GuardedApp(
        stream_route,
        OriginWatch(settings.cors_origins),
        routes=[
            stream_route,
            guard.admin("/stats", ok),
            guard.public("/publish", ok, methods=["POST"]),
            guard.probe("/healthz", ok),
        ],
        middleware=middleware,
        exception_handlers=dict(HANDLERS),
    )


async def status(app: Starlette, port: int, method: str, path: str, token: str = "") -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.request(
            method, f"http://broker:{port}{path}", headers=headers, timeout=5
        )
    return response.status_code


SURFACES = [
    # settings, port, method, path, token, expected status
    (Settings(), PUBLIC, "GET", "/stats", "", 200),  # auth off, nothing set: public
    (Settings(auth_secret=(SECRET,)), PUBLIC, "GET", "/stats", "", 404),  # hidden
    (Settings(auth_secret=(SECRET,)), PUBLIC, "POST", "/stats", "", 404),  # any method
    (Settings(admin_token=TOKEN), PUBLIC, "GET", "/stats", "", 401),
    (Settings(admin_token=TOKEN), PUBLIC, "HEAD", "/stats", "", 401),
    (Settings(admin_token=TOKEN), PUBLIC, "GET", "/stats", "wrong-token-0123456789", 401),
    (Settings(admin_token=TOKEN), PUBLIC, "GET", "/stats", TOKEN, 200),
    (Settings(), PUBLIC, "GET", "/stats%0A", "", 400),  # refused before any route matches
    (Settings(admin_port=ADMIN), PUBLIC, "GET", "/stats", "", 404),
    (Settings(admin_port=ADMIN), PUBLIC, "POST", "/stats", "", 404),
    (Settings(admin_port=ADMIN), ADMIN, "GET", "/stats", "", 200),
    (Settings(admin_port=ADMIN, admin_token=TOKEN), ADMIN, "GET", "/stats", "", 401),
    (Settings(admin_port=ADMIN, admin_token=TOKEN), ADMIN, "GET", "/stats", TOKEN, 200),
    (Settings(admin_port=ADMIN, admin_token=TOKEN), PUBLIC, "GET", "/stats", TOKEN, 404),
    (Settings(admin_port=ADMIN), ADMIN, "GET", "/healthz", "", 200),
    (Settings(admin_port=ADMIN), PUBLIC, "GET", "/healthz", "", 200),
    (Settings(admin_port=ADMIN), ADMIN, "GET", "/stream", "", 404),
    (Settings(admin_port=ADMIN), PUBLIC, "GET", "/stream", "", 200),
    (Settings(admin_port=ADMIN), PUBLIC, "HEAD", "/stream", "", 200),
    (Settings(), PUBLIC, "POST", "/stream", "", 405),
    (Settings(admin_port=ADMIN), ADMIN, "POST", "/publish", "", 404),
    (Settings(admin_port=ADMIN), PUBLIC, "POST", "/publish", "", 200),
    (Settings(admin_port=ADMIN), PUBLIC, "GET", "/publish", "", 405),
]


@pytest.mark.parametrize(("settings", "port", "method", "path", "token", "expected"), SURFACES)
async def test_each_route_is_served_where_its_surface_is(
    settings: Settings, port: int, method: str, path: str, token: str, expected: int
) -> None:
    assert await status(app_for(settings), port, method, path, token) == expected


def _routes(app: Starlette) -> dict[str, Route]:
    return {route.path: route for route in app.routes if isinstance(route, Route)}


def test_routes_carry_only_the_middleware_their_settings_need() -> None:
    plain = _routes(app_for(Settings()))
    assert not isinstance(plain["/stream"].app, StreamsPerClient)
    assert not isinstance(plain["/stats"].app, AdminToken)
    guarded = app_for(Settings(max_streams_per_ip=2, admin_token=TOKEN))
    routes = _routes(guarded)
    assert isinstance(routes["/stream"].app, StreamsPerClient)
    assert isinstance(routes["/stats"].app, AdminToken)
    assert not isinstance(routes["/publish"].app, StreamsPerClient | AdminToken)


async def test_a_stream_slot_is_held_while_the_request_runs_and_given_back() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def held(request: Request) -> Response:
        entered.set()
        await release.wait()
        return PlainTextResponse("done")

    app = app_for(Settings(max_streams_per_ip=1), stream=held)
    first = asyncio.create_task(status(app, PUBLIC, "GET", "/stream"))
    await asyncio.wait_for(entered.wait(), 5)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as client:
        refused = await client.get(f"http://broker:{PUBLIC}/stream", timeout=5)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert refused.json() == {
        "success": False,
        "error": "too many streams from this address (at most 1)",
    }
    release.set()
    assert await asyncio.wait_for(first, 5) == 200
    entered.clear()
    again = asyncio.create_task(status(app, PUBLIC, "GET", "/stream"))
    await asyncio.wait_for(entered.wait(), 5)  # the slot came back
    release.set()
    assert await asyncio.wait_for(again, 5) == 200


class Passed:
    """Middleware that records in `paths` the paths it passed on."""

    def __init__(self, app: ASGIApp, paths: list[str]) -> None:
        self.app = app
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


async def test_the_stream_route_runs_ahead_of_the_middleware_unless_cors_asks() -> None:
    paths: list[str] = []
    plain = app_for(Settings(), middleware=[Middleware(Passed, paths=paths)])
    assert await status(plain, PUBLIC, "GET", "/stream") == 200
    assert await status(plain, PUBLIC, "GET", "/healthz") == 200
    assert paths == ["/healthz"]
    cors_settings = Settings(cors_origins=("https://a.example",))
    cors = app_for(cors_settings, middleware=[Middleware(Passed, paths=paths)])
    transport = httpx.ASGITransport(app=cors)
    async with httpx.AsyncClient(transport=transport) as client:
        url = f"http://broker:{PUBLIC}/stream"
        assert (await client.get(url, headers={"Origin": "https://a.example"})).status_code == 200
        assert (await client.get(url)).status_code == 200
    assert paths == ["/healthz", "/stream"]


async def test_a_refusal_of_the_stream_route_is_answered_with_its_status() -> None:
    async def refuse(request: Request) -> Response:
        raise RequestError(400, "bad sessionId")

    app = app_for(Settings(), stream=refuse)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(f"http://broker:{PUBLIC}/stream", timeout=5)
    assert response.status_code == 400
    assert response.json() == {"success": False, "error": "bad sessionId"}
