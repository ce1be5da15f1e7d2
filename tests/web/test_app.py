"""broker.web.app in process: the application `create_app` builds, with its lifespan (a real
broker on the test cluster), driven through httpx's ASGI transport. Over real sockets and
processes the API is test_api's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from broker.config.settings import Settings
from broker.web.app import MAX_BODY_BYTES, create_app
from tests.support.database import Database


@pytest.fixture(scope="module")
async def app(cluster: Database) -> AsyncIterator[Starlette]:
    settings = Settings(database_url=cluster.url, cors_origins=("https://app.example",))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await app.state.broker.started.wait()
        yield app


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://broker:5001") as client:
        yield client


def test_each_route_is_declared_once() -> None:
    app = create_app(Settings())
    paths = [route.path for route in app.routes if isinstance(route, BaseRoute)]  # type: ignore[attr-defined]
    assert len(paths) == len(set(paths))
    assert {"/api/sse/messages", "/api/sse/stats", "/api/messages", "/metrics"} <= set(paths)
    assert app.router.redirect_slashes is False


async def test_probes_answer_once_the_listener_is_up(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"success": True, "data": {"status": "ok"}}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["data"] == {"status": "ready"}


async def test_an_unknown_path_is_404_with_no_redirect(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/sse/messages/?token=secret")
    assert response.status_code == 404 and "location" not in response.headers


async def test_a_posted_message_is_stored_and_answered_in_the_wire_shape(
    client: httpx.AsyncClient, session_id: str
) -> None:
    body = {"sessionId": session_id, "content": "你好", "robotId": "r1", "isFromBot": True}
    response = await client.post("/api/messages", json=body)
    assert response.status_code == 201
    data = response.json()["data"]
    assert (data["sessionId"], data["content"], data["robotId"]) == (session_id, "你好", "r1")
    assert data["isFromBot"] is True and data["id"].isdigit()


@pytest.mark.parametrize(
    ("headers", "content", "status"),
    [
        ({"content-type": "text/plain"}, b"{}", 415),
        ({"content-type": "application/json"}, b"{not json", 400),
        ({"content-type": "application/json"}, b"x" * (MAX_BODY_BYTES + 1), 413),
    ],
)
async def test_a_refused_post_is_one_error_body(
    client: httpx.AsyncClient, headers: dict[str, str], content: bytes, status: int
) -> None:
    response = await client.post("/api/messages", headers=headers, content=content)
    assert response.status_code == status
    assert response.json()["success"] is False and response.json()["error"]


async def test_a_bad_session_id_is_400_before_anything_is_held(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    response = await client.get("/api/sse/messages", params={"sessionId": "a\x07b"})
    assert response.status_code == 400 and response.json()["success"] is False
    assert len(app.state.broker.hub) == 0


async def test_head_of_the_stream_answers_its_headers_and_holds_nothing(
    client: httpx.AsyncClient, app: Starlette, session_id: str
) -> None:
    response = await client.head("/api/sse/messages", params={"sessionId": session_id})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert len(app.state.broker.hub) == 0


async def test_stats_and_metrics_read_the_same_counters(
    client: httpx.AsyncClient, session_id: str
) -> None:
    stats = (await client.get("/api/sse/stats")).json()
    assert stats["success"] is True and stats["data"]["totalConnections"] == 0
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and "pgsse_" in metrics.text


async def test_cors_answers_a_configured_origin_only(client: httpx.AsyncClient) -> None:
    allowed = await client.get("/healthz", headers={"Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = await client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


async def test_a_stream_on_a_server_without_our_sink_ends_itself_at_the_replay_limit(
    database: Database, session_id: str
) -> None:
    """No `SocketSink` in the scope (not our uvicorn protocol): the stream hears its client
    through ASGI `receive`, and still ends when it closes itself."""
    first = database.insert(session_id, "one")
    database.insert(session_id, "two")
    app = create_app(Settings(database_url=database.url, replay_limit=1))
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.broker.started.wait(), 10)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker:5001") as client:
            params = {"sessionId": session_id, "lastEventId": str(first - 1)}
            response = await asyncio.wait_for(client.get("/api/sse/messages", params=params), 10)
        assert len(app.state.broker.hub) == 0
    assert response.status_code == 200
    assert f"id: {first}\n" in response.text and '"content":"two"' not in response.text
    assert '"error":"replay limit reached' in response.text
