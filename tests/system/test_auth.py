"""Signed tokens on real brokers: what a token lets its bearer read and write (the verifier
itself, in process: tests/web/test_auth.py).

Each refusal is checked for its status, its JSON body and that it is not a stream; each grant
by reading real rows inserted into PostgreSQL. Every broker log of these tests is scanned for
token and secret text (`no_secret_in_logs`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.security import (
    mint,
    new_secret,
    no_secret_in_logs,  # noqa: F401 -- autouse: no token or secret in any broker log
    open_stream,
    refused,
    request,
    unsigned,
)
from tests.support.sse import SSEClient, connected

StartBroker = Callable[..., BrokerProcess]


async def test_open_mode_needs_no_token_and_warns_once(
    start_broker: StartBroker, session_id: str
) -> None:
    broker = start_broker()
    client = await connected(await open_stream(broker.port, {"sessionId": session_id}))
    await client.close()
    status, _ = broker.get("/api/sse/stats")
    assert status == 200  # open mode keeps the admin surface public, as before
    broker.stop()
    exposure = [e for e in broker.log_events() if e["event"] in ("auth_disabled", "admin_hidden")]
    assert [(e["event"], e["level"]) for e in exposure] == [("auth_disabled", "warning")]


def _secured(start_broker: StartBroker, *secrets: str, **env: str) -> BrokerProcess:
    return start_broker(BROKER_AUTH_SECRET=",".join(secrets), **env)


async def test_stream_refuses_missing_bad_and_out_of_scope_tokens(
    start_broker: StartBroker, session_id: str
) -> None:
    secret = new_secret()
    broker = _secured(start_broker, secret)
    other = session_id + "-other"
    token = mint(secret, [session_id])
    robot_token = mint(secret, [session_id], robots=["r1"])
    cases: list[tuple[str, dict[str, str], dict[str, str], int]] = [
        ("missing", {"sessionId": session_id}, {}, 401),
        ("empty", {"sessionId": session_id, "token": ""}, {}, 401),
        ("malformed", {"sessionId": session_id, "token": "abc.def.ghi"}, {}, 401),
        ("truncated", {"sessionId": session_id, "token": token[:-10]}, {}, 401),
        ("expired", {"sessionId": session_id, "token": mint(secret, "*", ttl=-60)}, {}, 401),
        ("wrong-signature", {"sessionId": session_id, "token": mint(new_secret(), "*")}, {}, 401),
        ("alg-none", {"sessionId": session_id, "token": unsigned("*")}, {}, 401),
        ("basic-auth", {"sessionId": session_id}, {"Authorization": "Basic dTpw"}, 401),
        ("bearer-garbage", {"sessionId": session_id}, {"Authorization": "Bearer x.y.z"}, 401),
        ("other-session", {"sessionId": other, "token": token}, {}, 403),
        ("global-without-star", {"token": token}, {}, 403),
        ("robot-scope-needs-robotId", {"sessionId": session_id, "token": robot_token}, {}, 403),
        (
            "robot-out-of-scope",
            {"sessionId": session_id, "robotId": "r2", "token": robot_token},
            {},
            403,
        ),
    ]
    for name, params, headers, expected in cases:
        client = await SSEClient.open(broker.port, params=params, headers=headers)
        status, response_headers, body = await refused(client)
        assert (name, status) == (name, expected), body
        assert body["success"] is False and isinstance(body["error"], str), name
        if expected == 401:
            assert response_headers["www-authenticate"].startswith("Bearer"), name
    # The broker still serves a good token.
    good = await connected(
        await open_stream(broker.port, {"sessionId": session_id, "token": token})
    )
    await good.close()


async def test_a_token_for_a_session_reads_it_and_nothing_else(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    secret = new_secret()
    broker = _secured(start_broker, secret)
    other = session_id + "-other"
    token = mint(secret, [session_id])
    by_query = await connected(
        await open_stream(broker.port, {"sessionId": session_id, "token": token})
    )
    by_header = await connected(
        await open_stream(
            broker.port, {"sessionId": session_id}, {"Authorization": f"Bearer {token}"}
        )
    )
    robot_only = await connected(
        await open_stream(
            broker.port,
            {"sessionId": session_id, "robotId": "r1"},
            {"Authorization": f"Bearer {mint(secret, [session_id], robots=['r1'])}"},
        )
    )
    database.insert(other, "not yours", "r1")
    database.insert(session_id, "other robot", "r2")
    mine = database.insert(session_id, "yours", "r1")
    for client in (by_query, by_header, robot_only):
        events = await client.events_until(lambda e: e.id == str(mine), timeout=5)
        messages = [e.json["data"] for e in events if e.type == "message"]
        assert all(m["sessionId"] == session_id for m in messages)
        if client is robot_only:
            assert [m["content"] for m in messages] == ["yours"]
        else:
            assert [m["content"] for m in messages] == ["other robot", "yours"]
        await client.close()


async def test_a_star_token_reads_the_global_stream(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    secret = new_secret()
    broker = _secured(start_broker, secret)
    client = await connected(await open_stream(broker.port, {"token": mint(secret, "*")}))
    first = database.insert(session_id + "-a", "a")
    second = database.insert(session_id + "-b", "b")
    events = await client.events_until(lambda e: e.id == str(second), timeout=5)
    assert [e.id for e in events if e.type == "message"][-2:] == [str(first), str(second)]
    await client.close()


async def test_rotation_old_secret_works_while_listed_and_not_after(
    start_broker: StartBroker, session_id: str
) -> None:
    old, new = new_secret(), new_secret()
    old_token = mint(old, [session_id])
    new_token = mint(new, [session_id])
    params = {"sessionId": session_id}

    rotating = _secured(start_broker, new, old)
    for token in (old_token, new_token):
        client = await connected(await open_stream(rotating.port, {**params, "token": token}))
        await client.close()
    rotating.stop()

    rotated = _secured(start_broker, new)
    client = await SSEClient.open(rotated.port, params={**params, "token": old_token})
    status, _, body = await refused(client)
    assert (status, body["error"]) == (401, "token signature invalid")
    client = await connected(await open_stream(rotated.port, {**params, "token": new_token}))
    await client.close()


def _rows(database: Database, *sessions: str) -> int:
    rows = database.query(
        "SELECT count(*) FROM messages WHERE session_id = ANY(%s)", (list(sessions),)
    )
    return int(rows[0][0])


async def test_publish_requires_the_publish_right_within_scope(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    secret = new_secret()
    broker = _secured(start_broker, secret)
    other = session_id + "-other"

    async def post(body: dict[str, Any], headers: dict[str, str], target: str = "") -> Any:
        return await request(
            broker.port,
            "POST",
            "/api/messages" + target,
            {"Content-Type": "application/json", **headers},
            json.dumps(body).encode(),
        )

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    reader = mint(secret, "*")
    writer = mint(secret, [session_id], robots=["r1"], publish=True)
    message = {"sessionId": session_id, "content": "hi", "robotId": "r1"}
    cases: list[tuple[str, dict[str, Any], dict[str, str], str, int]] = [
        ("no-token", message, {}, "", 401),
        ("malformed", message, bearer("abc"), "", 401),
        ("expired", message, bearer(mint(secret, "*", publish=True, ttl=-60)), "", 401),
        ("wrong-signature", message, bearer(mint(new_secret(), "*", publish=True)), "", 401),
        ("reader", message, bearer(reader), "", 403),
        ("query-token-not-taken", message, {}, f"?token={writer}", 401),
        ("other-session", {**message, "sessionId": other}, bearer(writer), "", 403),
        ("other-robot", {**message, "robotId": "r2"}, bearer(writer), "", 403),
        ("no-robot", {"sessionId": session_id, "content": "hi"}, bearer(writer), "", 403),
    ]
    for name, body, headers, target, expected in cases:
        answer = await post(body, headers, target)
        assert (name, answer.status) == (name, expected), answer.body
        assert answer.json["success"] is False, name
    assert _rows(database, session_id, other) == 0  # no refused request wrote a row

    subscriber = await connected(
        await open_stream(broker.port, {"sessionId": session_id, "token": reader})
    )
    answer = await post(message, bearer(writer))
    assert answer.status == 201, answer.body
    stored = answer.json["data"]
    assert (stored["sessionId"], stored["robotId"], stored["content"]) == (session_id, "r1", "hi")
    assert _rows(database, session_id, other) == 1
    assert (await subscriber.message(timeout=5)).id == stored["id"]
    await subscriber.close()


async def test_probes_stay_open_with_auth(start_broker: StartBroker) -> None:
    broker = _secured(start_broker, new_secret())
    assert broker.get("/healthz")[0] == 200
    assert broker.get("/readyz")[0] == 200


async def test_tokens_are_logged_by_fingerprint_only(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    secret = new_secret()
    broker = _secured(start_broker, secret, BROKER_LOG_LEVEL="debug")  # stream_opened is debug
    good = mint(secret, [session_id], publish=True)
    expired = mint(secret, [session_id], ttl=-60)
    foreign = mint(new_secret(), [session_id])
    for token in (expired, foreign):
        client = await SSEClient.open(broker.port, params={"sessionId": session_id, "token": token})
        assert (await refused(client))[0] == 401
    client = await SSEClient.open(broker.port, params={"sessionId": "elsewhere", "token": good})
    assert (await refused(client))[0] == 403
    client = await connected(
        await open_stream(broker.port, {"sessionId": session_id, "token": good})
    )
    await request(
        broker.port,
        "POST",
        "/api/messages",
        {"Content-Type": "application/json", "Authorization": f"Bearer {good}"},
        json.dumps({"sessionId": session_id, "content": "x"}).encode(),
    )
    await client.message(timeout=5)
    await client.close()
    broker.stop()

    log = broker.log_path.read_text()
    for token in (good, expired, foreign):
        assert token not in log and token.split(".")[2] not in log
    events = broker.log_events()
    fingerprints = {e.get("token") for e in events if e.get("token")}

    def fingerprint(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()[:8]

    # The log still tells the requests apart: each token by its fingerprint.
    assert {fingerprint(good), fingerprint(expired), fingerprint(foreign)} <= fingerprints
    refusals = [e for e in events if e["event"] == "auth_refused"]
    assert {e["reason"] for e in refusals} == {"token expired", "token signature invalid"}
    forbidden = [e for e in events if e["event"] == "auth_forbidden"]
    assert [e["token"] for e in forbidden] == [fingerprint(good)]
    opened = [e for e in events if e["event"] == "stream_opened"]
    assert opened and all(e["token"] == fingerprint(good) for e in opened)


def test_broker_token_prints_a_token_signed_with_the_first_secret() -> None:
    first, second = new_secret(), new_secret()
    env = {**os.environ, "BROKER_AUTH_SECRET": f"{first},{second}", "BROKER_LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "broker", "token", "--sessions", "a,b", "--robots", "*"]
    done = subprocess.run(
        [*command, "--publish", "--ttl", "60"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    claims = jwt.decode(token, first, algorithms=["HS256"])
    assert claims["sessions"] == ["a", "b"] and claims["robots"] == "*"
    assert claims["publish"] is True and 55 <= claims["exp"] - claims["iat"] <= 60
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, second, algorithms=["HS256"])
    reader = subprocess.run(
        [*command[:-4], "--sessions", "*"], env=env, capture_output=True, text=True, timeout=30
    )
    assert jwt.decode(reader.stdout.strip(), first, algorithms=["HS256"])["publish"] is False

    no_secret = {k: v for k, v in env.items() if k != "BROKER_AUTH_SECRET"}
    failed = subprocess.run(command, env=no_secret, capture_output=True, text=True, timeout=30)
    assert failed.returncode != 0 and "BROKER_AUTH_SECRET" in failed.stderr
    assert failed.stdout == ""


async def test_many_refusals_leave_no_stream_open(
    start_broker: StartBroker, session_id: str
) -> None:
    secret = new_secret()
    admin_token = "admin-" + new_secret()
    broker = _secured(start_broker, secret, BROKER_ADMIN_TOKEN=admin_token)
    bad = mint(secret, ["elsewhere"])

    async def attempt() -> int:
        client = await SSEClient.open(broker.port, params={"sessionId": session_id, "token": bad})
        return (await refused(client))[0]

    assert set(await asyncio.gather(*(attempt() for _ in range(50)))) == {403}
    answer = await request(
        broker.port, "GET", "/api/sse/stats", {"Authorization": f"Bearer {admin_token}"}
    )
    assert answer.status == 200 and answer.json["data"]["totalConnections"] == 0


async def test_each_session_of_a_stream_must_be_covered_by_the_token(
    start_broker: StartBroker, database: Database, session_id: str
) -> None:
    secret = new_secret()
    broker = _secured(start_broker, secret)
    other = session_id + "-other"
    token = mint(secret, [session_id, other])
    both = [("sessionId", session_id), ("sessionId", other), ("token", token)]
    client = await connected(await open_stream(broker.port, both))
    third = [("sessionId", session_id), ("sessionId", session_id + "-not-in-token")]
    status, _, body = await refused(await open_stream(broker.port, [*third, ("token", token)]))
    assert status == 403 and body["error"] == "token does not allow this sessionId"
    rows = [database.insert(s, "row") for s in (other, session_id + "-not-in-token", session_id)]
    events = await client.events_until(lambda e: e.id == str(rows[2]), timeout=5)
    assert [int(e.id) for e in events if e.id] == [rows[0], rows[2]]
    await client.close()
