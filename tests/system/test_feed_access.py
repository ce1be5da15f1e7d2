"""Who may see which feed, on real brokers: `GET /api/feeds` (guarded as stats are) and the
`feeds` claim of tokens on `GET /api/sse/<feed>`. The claim itself, in process:
tests/web/test_auth.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.database import Database
from tests.support.feeds import Scratch, orders_shop
from tests.support.processes import BrokerProcess, free_port, http_json
from tests.support.security import (
    mint,
    new_secret,
    no_secret_in_logs,  # noqa: F401 -- autouse: no token or secret in any broker log
    refused,
    request,
)
from tests.support.sse import SSEClient, connected

StartBroker = Callable[..., BrokerProcess]

MESSAGES_ENTRY = {
    "name": "messages",
    "key": "sessionId",
    "filters": ["robotId"],
    "events": ["insert", "update", "delete"],
}
ORDERS_ENTRY = {
    "name": "orders",
    "key": "customer_id",
    "filters": ["status", "region"],
    "events": ["insert", "update", "delete"],
}


@pytest.fixture
def shop(database: Database, tmp_path: Path) -> Iterator[tuple[Scratch, Path]]:
    with orders_shop(database, tmp_path) as made:
        yield made


def test_feeds_lists_messages_first_then_the_declared_feeds(
    start_broker: StartBroker, shop: tuple[Scratch, Path]
) -> None:
    scratch, config = shop
    broker = start_broker(DATABASE_URL=scratch.url, BROKER_CONFIG=str(config))
    status, body = broker.get("/api/feeds")
    assert status == 200, body
    assert body == {"success": True, "data": [MESSAGES_ENTRY, ORDERS_ENTRY]}


def test_without_a_feeds_file_the_list_is_messages_inserts(broker: BrokerProcess) -> None:
    status, body = broker.get("/api/feeds")
    assert status == 200
    assert body["data"] == [{**MESSAGES_ENTRY, "events": ["insert"]}]


async def test_feeds_is_guarded_as_stats_are(start_broker: StartBroker) -> None:
    """Auth on with no admin token: hidden (404) like stats; with an admin token, only with
    it; with an admin port, only there."""
    hidden = start_broker(BROKER_AUTH_SECRET=new_secret())
    for path in ("/api/feeds", "/api/sse/stats"):
        assert (await request(hidden.port, target=path)).status == 404

    admin_token = new_secret()
    guarded = start_broker(BROKER_AUTH_SECRET=new_secret(), BROKER_ADMIN_TOKEN=admin_token)
    assert (await request(guarded.port, target="/api/feeds")).status == 401
    bearer = {"Authorization": f"Bearer {admin_token}"}
    answer = await request(guarded.port, target="/api/feeds", headers=bearer)
    assert answer.status == 200 and answer.json["data"][0]["name"] == "messages"


def test_feeds_on_the_admin_port_only(start_broker: StartBroker) -> None:
    admin_port = free_port()
    broker = start_broker(BROKER_ADMIN_PORT=str(admin_port))
    assert broker.get("/api/feeds")[0] == 404
    status, body = http_json(f"http://127.0.0.1:{admin_port}/api/feeds")
    assert status == 200 and body["data"][0]["name"] == "messages"


async def test_a_token_for_orders_key_42_reads_42_and_nothing_else(
    start_broker: StartBroker, shop: tuple[Scratch, Path]
) -> None:
    scratch, config = shop
    secret = new_secret()
    broker = start_broker(
        DATABASE_URL=scratch.url, BROKER_CONFIG=str(config), BROKER_AUTH_SECRET=secret
    )
    token = mint(secret, [], feeds={"orders": ["42"]})

    async def orders(params: dict[str, str] | list[tuple[str, str]]) -> SSEClient:
        return await SSEClient.open(broker.port, "/api/sse/orders", params=params)

    reader = await connected(await orders({"customer_id": "42", "token": token}))
    scratch.execute(
        "INSERT INTO shop.orders (customer_id, status) VALUES ('43', 'open'), ('42', 'open')"
    )
    changes = await reader.events_until(lambda event: event.type == "insert", timeout=5)
    assert changes[-1].json["data"]["customer_id"] == "42"  # 43's, first, never reached it
    await reader.close()

    refusals: dict[str, tuple[dict[str, str] | list[tuple[str, str]], int, str]] = {
        "another key": ({"customer_id": "43", "token": token}, 403, "key of feed orders"),
        "its key and another": (
            [("customer_id", "42"), ("customer_id", "43"), ("token", token)],
            403,
            "key of feed orders",
        ),
        "the global stream": ({"token": token}, 403, "global stream of feed orders"),
        "no feeds claim": ({"customer_id": "42", "token": mint(secret, "*")}, 403, "feed orders"),
        "malformed claim": (
            {"customer_id": "42", "token": mint(secret, [], feeds={"orders": 42})},
            401,
            "claim feeds",
        ),
        "no token": ({"customer_id": "42"}, 401, "token required"),
    }
    for name, (params, expected, says) in refusals.items():
        status, _, body = await refused(await orders(params))
        assert (name, status) == (name, expected), body
        assert body["success"] is False and says in body["error"], (name, body)

    everything = mint(secret, [], feeds={"orders": "*"})
    global_reader = await connected(await orders({"token": everything}))
    await global_reader.close()
