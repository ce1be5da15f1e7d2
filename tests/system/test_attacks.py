"""The attacks of a security review that held, kept as a table so no change reopens one quietly.

One broker, set up as the attacked one was (tokens, an admin token, a per-client cap, a 3 s
header timeout), answers each row's raw request on its own socket. Every row checks its
status, that no answer carries admin data or token text, and that exactly one answer comes
back (a smuggled second request is never served). What other modules already drive is named
beside the table instead of repeated: slowloris and head sizes (test_limits), token claims
and rotation (test_auth), arbitrary input (test_fuzz), the attacks that once got through
(test_holds_nothing). No broker log may hold a token or secret (`no_secret_in_logs`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from tests.support.database import Database
from tests.support.security import (
    RawClient,
    admin_stats,
    mint,
    module_broker,
    new_secret,
    no_secret_in_logs,  # noqa: F401 -- autouse: no token or secret in any broker log
    remember,
    unsigned,
)

SESSION, OTHER, ROBOT = "atk-a", "atk-b", "atk-r"
SECRET, ADMIN = new_secret(), "adm-" + new_secret()
READER = mint(SECRET, [SESSION])
PUBLISHER = mint(SECRET, [SESSION], publish=True)
STAR = mint(SECRET, "*")


def _forged(header: dict[str, str], secret: str = SECRET) -> str:
    token = jwt.encode(
        {"sessions": "*", "publish": True, "exp": int(time.time()) + 600},
        secret,
        algorithm="HS256",
        headers=header,
    )
    remember(token)
    return token


TOKENS = {
    "none": unsigned("*"),
    "hs512": mint(new_secret(64), "*", algorithm="HS512"),
    "foreign": mint(new_secret(), "*", publish=True),
    "expired": mint(SECRET, "*", publish=True, ttl=-60),
    "jku": _forged({"jku": "https://evil.example/keys", "kid": "../../dev/null"}, new_secret()),
    "robots": mint(SECRET, [SESSION], robots=[ROBOT]),
}


@dataclass(frozen=True)
class Attack:
    name: str
    request: bytes
    statuses: tuple[int, ...]
    head_only: bool = False


def stream(query: str, *headers: str) -> bytes:
    return raw("GET", f"/api/sse/messages?{query}", *headers)


def raw(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def post(body: str, *headers: str) -> bytes:
    data = body.encode()
    framing = ("Content-Type: application/json", f"Content-Length: {len(data)}")
    return raw("POST", "/api/messages", *framing, *headers, body=data)


BEARER = f"Authorization: Bearer {PUBLISHER}"
ATTACKS = [
    # Tokens and algorithm confusion.
    Attack("no-token", stream(f"sessionId={SESSION}"), (401,)),
    Attack("alg-none", stream(f"sessionId={SESSION}&token={TOKENS['none']}"), (401,)),
    Attack("alg-hs512", stream(f"sessionId={SESSION}&token={TOKENS['hs512']}"), (401,)),
    Attack("foreign-secret", stream(f"sessionId={SESSION}&token={TOKENS['foreign']}"), (401,)),
    Attack("expired", stream(f"sessionId={SESSION}&token={TOKENS['expired']}"), (401,)),
    Attack("jku-kid-header", stream(f"sessionId={SESSION}&token={TOKENS['jku']}"), (401,)),
    Attack(
        "basic-scheme", stream(f"sessionId={SESSION}", f"Authorization: Basic {READER}"), (401,)
    ),
    Attack("token-truncated", stream(f"sessionId={SESSION}&token={READER[:-4]}"), (401,)),
    Attack("robot-list-no-robot", stream(f"sessionId={SESSION}&token={TOKENS['robots']}"), (403,)),
    # Cross-session reads.
    Attack("other-session", stream(f"sessionId={OTHER}&token={READER}"), (403,)),
    Attack("global-with-list", stream(f"token={READER}"), (403,)),
    Attack(
        "session-twice", stream(f"sessionId={SESSION}&sessionId={OTHER}&token={READER}"), (403,)
    ),
    Attack("session-reserved", stream(f"sessionId=global&token={STAR}"), (400,)),
    # Writing without the right.
    Attack(
        "post-reader",
        post(f'{{"sessionId":"{SESSION}","content":"x"}}', f"Authorization: Bearer {READER}"),
        (403,),
    ),
    Attack(
        "post-token-in-query",
        raw(
            "POST",
            f"/api/messages?token={PUBLISHER}",
            "Content-Type: application/json",
            "Content-Length: 2",
            body=b"{}",
        ),
        (401,),
    ),
    Attack("post-other-session", post(f'{{"sessionId":"{OTHER}","content":"x"}}', BEARER), (403,)),
    Attack(
        "post-expired",
        post(
            f'{{"sessionId":"{SESSION}","content":"x"}}',
            f"Authorization: Bearer {TOKENS['expired']}",
        ),
        (401,),
    ),
    # The admin surface.
    Attack("stats", raw("GET", "/api/sse/stats"), (401,)),
    Attack("metrics", raw("GET", "/metrics"), (401,)),
    Attack("stats-newline", raw("GET", "/api/sse/stats%0A"), (400,)),
    Attack("metrics-newline", raw("GET", "/metrics%0A"), (400,)),
    Attack("stats-escaped", raw("GET", "/api/sse/%73tats"), (401, 404)),
    Attack("stats-dot-segment", raw("GET", "/api/sse/./stats"), (401, 404)),
    Attack("stats-double-slash", raw("GET", "//api/sse/stats"), (401, 404)),
    Attack("stats-head", raw("HEAD", "/api/sse/stats"), (401,), head_only=True),
    Attack("stats-jwt-bearer", raw("GET", "/metrics", f"Authorization: Bearer {STAR}"), (401,)),
    Attack("stats-forwarded-local", raw("GET", "/metrics", "X-Forwarded-For: 127.0.0.1"), (401,)),
    Attack("stats-admin-as-query", raw("GET", f"/api/sse/stats?token={ADMIN}"), (401,)),
    # Injection into SQL and into the event framing.
    Attack("sql-in-session", stream(f"sessionId=%27%20OR%201%3D1%20--&token={STAR}"), (200,)),
    Attack("crlf-in-session", stream(f"sessionId=a%0D%0Adata:%20x&token={STAR}"), (400,)),
    Attack(
        "crlf-in-robot", stream(f"sessionId={SESSION}&robotId=r%0Aid:%201&token={STAR}"), (400,)
    ),
    Attack("nul-in-session", stream(f"sessionId=a%00b&token={STAR}"), (400,)),
    Attack(
        "last-event-id-sql",
        stream(f"sessionId={SESSION}&token={READER}", "Last-Event-ID: 1; DROP TABLE messages"),
        (200,),
    ),
    Attack(
        "post-sql",
        post(f'{{"sessionId":"{SESSION}","content":"x\'); DROP TABLE messages; --"}}', BEARER),
        (201,),
    ),
    Attack(
        "post-framing",
        post(f'{{"sessionId":"{SESSION}","content":"a\\n\\ndata: {{}}\\n\\nid: 9"}}', BEARER),
        (201,),
    ),
    Attack("post-nul", post(f'{{"sessionId":"{SESSION}","content":"a\\u0000b"}}', BEARER), (400,)),
    # Path traversal through the static files.
    Attack("static-dotdot", raw("GET", "/static/../pyproject.toml"), (404,)),
    Attack("static-encoded-dotdot", raw("GET", "/static/%2e%2e/%2e%2e/pyproject.toml"), (404,)),
    Attack("static-encoded-slash", raw("GET", "/static/..%2f..%2fpyproject.toml"), (404,)),
    Attack("static-absolute", raw("GET", "/static//etc/passwd"), (404,)),
    Attack("static-nul", raw("GET", "/static/sse-client.js%00.html"), (400,)),
    Attack("static-backslash", raw("GET", "/static/..%5c..%5cpyproject.toml"), (404,)),
    # Request smuggling: one answer, never a second request served from a body.
    Attack(
        "cl-and-te",
        raw(
            "POST",
            "/api/messages",
            "Content-Length: 4",
            "Transfer-Encoding: chunked",
            body=b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (400,),
    ),
    Attack(
        "cl-twice",
        raw(
            "POST",
            "/api/messages",
            "Content-Length: 0",
            "Content-Length: 37",
            body=b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (400,),
    ),
    Attack(
        "te-obfuscated",
        raw("POST", "/api/messages", "Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
        (400, 401),
    ),
    Attack(
        "get-with-body",
        raw("GET", "/healthz", "Content-Length: 35", body=b"GET /api/sse/stats HTTP/1.1\r\n\r\n"),
        (400,),
    ),
    Attack(
        "http10-te",
        b"POST /api/messages HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        (400, 401),
    ),
    Attack(
        "space-before-colon",
        raw("POST", "/api/messages", "Content-Length : 5", body=b"hello"),
        (400,),
    ),
    Attack("bare-cr", b"GET /healthz HTTP/1.1\rHost: x\r\n\r\n", (400,)),
]
COVERED_ELSEWHERE = {
    "slowloris heads, oversized heads": "test_limits",
    "secret rotation, claim types, fingerprints in logs": "test_auth",
    "per-client cap and X-Forwarded-For spoofing": "test_limits",
    "arbitrary requests and claims": "test_fuzz",
    "HEAD, pipelining, bodies, redirects, expiry, replay memory": "test_holds_nothing",
}


@pytest.fixture(scope="module")
def target(cluster: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with module_broker(
        cluster.url,
        tmp_path_factory.mktemp("attacks") / "broker.log",
        BROKER_AUTH_SECRET=SECRET,
        BROKER_ADMIN_TOKEN=ADMIN,
        BROKER_MAX_STREAMS_PER_IP="20",
        BROKER_HEADER_TIMEOUT_SECONDS="3",
    ) as broker:
        yield broker.port


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_attack_is_refused(target: int, attack: Attack) -> None:
    with RawClient(target) as client:
        client.send(attack.request)
        answer = client.answer(head_only=attack.head_only)
        if not answer.is_stream:
            # Nothing further: a smuggled request would be answered right after.
            client.sock.settimeout(0.3)
            more = b""
            with contextlib.suppress(TimeoutError, ConnectionError):
                more = client.sock.recv(65536)
            assert b"HTTP/1." not in client.data + more, f"a second answer: {more[:200]!r}"
    assert answer.status in attack.statuses, (attack.name, answer.status, answer.body[:200])
    text = repr(answer.headers) + answer.body.decode(errors="replace")
    assert "totalConnections" not in text and "# TYPE" not in text
    assert "location" not in answer.headers
    assert all(token not in text for token in (READER, PUBLISHER, STAR, ADMIN))


def test_after_the_attacks_nothing_is_held_and_the_table_stands(
    target: int, database: Database
) -> None:
    """Runs after the table (file order)."""
    rows = database.query("SELECT content FROM messages WHERE session_id = %s", (SESSION,))
    assert ("x'); DROP TABLE messages; --",) in rows  # stored literally, table intact
    assert all(content != "x" for (content,) in rows)  # the refused posts wrote nothing
    assert database.query("SELECT count(*) FROM messages WHERE session_id = %s", (OTHER,)) == [(0,)]
    stats: dict[str, int] = {}

    def settled() -> bool:
        stats.update(admin_stats(target, ADMIN))
        return stats["totalConnections"] == 0

    deadline = time.monotonic() + 5
    while not settled():
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_no_attack_reads_another_sessions_rows_by_resuming(target: int, database: Database) -> None:
    """A reader of SESSION resuming from before a row of OTHER gets SESSION's rows only."""
    other = database.insert(OTHER, "not yours")
    mine = database.insert(SESSION, "yours")
    with RawClient(target) as client:
        client.send(stream(f"sessionId={SESSION}&token={READER}", f"Last-Event-ID: {other - 1}"))
        assert client.answer(head_only=True).status == 200
        replay = client.read_until(f"id: {mine}\n".encode())
        client.read_until(b"\n\n")
    assert b"not yours" not in replay
    database.query("DELETE FROM messages WHERE id = %s RETURNING id", (other,))


def test_the_table_names_what_it_leaves_to_other_modules() -> None:
    tests = Path(__file__).parent
    for module in set(COVERED_ELSEWHERE.values()):
        assert (tests / f"{module}.py").is_file(), module
