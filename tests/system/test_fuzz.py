"""Hostile input, property-based: arbitrary requests against one running broker.

Hypothesis throws query strings, headers, `Last-Event-ID` values, tokens (garbage, expired,
foreign, and validly signed ones with arbitrary claims) and JSON bodies at every endpoint of
one broker with auth, an admin token, a per-client cap and CORS all switched on. Each
request runs on its own socket with bounded reads. For every one: an answer arrives, it is
never a 5xx, a finite answer ends, a stream starts with `connected`, and a row is written only
by a 201 carrying a token whose claims allow it. Afterwards no stream, slot or socket is left.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.security import (
    mint,
    module_broker,
    new_secret,
    remember,
)

READ_TIMEOUT = 5.0
SESSION = "fuzz-a"
ROBOT = "fuzz-r"
CAP = 8
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # each request is bounded by READ_TIMEOUT instead
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# One secret and one set of tokens for the module, so the strategies can hold real tokens.
SECRET = new_secret()
ADMIN_TOKEN = "adm-" + new_secret()
TOKENS = {
    "reader": mint(SECRET, [SESSION]),
    "reader_star": mint(SECRET, "*"),
    "robot_reader": mint(SECRET, [SESSION], robots=[ROBOT]),
    "publisher": mint(SECRET, [SESSION], publish=True),
    "publisher_star": mint(SECRET, "*", publish=True),
    "expired_publisher": mint(SECRET, "*", publish=True, ttl=-60),
    "foreign_publisher": mint(new_secret(), "*", publish=True),
    "admin": ADMIN_TOKEN,
}
ORIGINS = [b"https://app.example.com", b"https://evil.example.com", b"null"]


@dataclass
class Fuzzed:
    broker: BrokerProcess
    database: Database

    @property
    def port(self) -> int:
        return self.broker.port


@pytest.fixture(scope="module")
def fuzzed(cluster: Database, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    with module_broker(
        cluster.url,
        tmp_path_factory.mktemp("fuzz") / "broker.log",
        BROKER_AUTH_SECRET=SECRET,
        BROKER_ADMIN_TOKEN=ADMIN_TOKEN,
        BROKER_MAX_STREAMS_PER_IP=str(CAP),
        BROKER_TRUSTED_PROXIES="127.0.0.1/32",
        BROKER_CORS_ORIGINS="https://app.example.com",
        BROKER_HEADER_TIMEOUT_SECONDS="5",
        BROKER_MAX_HEADER_BYTES="8192",
    ) as broker:
        yield Fuzzed(broker, cluster)


# Requests


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(port: int, raw: bytes, method: str) -> Answer:
    """Send `raw` on a new socket; the answer, read with bounded waits. A stream is read up
    to its `connected` event, then dropped. Raises `TimeoutError` if the broker stalls."""
    deadline = time.monotonic() + READ_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(raw)
        data = b""

        def more() -> bool:
            nonlocal data
            if time.monotonic() > deadline:
                raise TimeoutError(f"stuck answering {raw[:200]!r}: got {data[:300]!r}")
            chunk = sock.recv(65536)
            data += chunk
            return bool(chunk)

        while b"\r\n\r\n" not in data:
            assert more(), f"connection closed with no answer to {raw[:200]!r}: {data!r}"
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        data = body
        if method == "HEAD" or status in (204, 304):
            return Answer(status, headers, b"")
        if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
            while b'"type":"connected"' not in data:
                assert more(), f"stream ended before connected: {data!r}"
            return Answer(status, headers, data)
        while more():  # Connection: close, so a finite answer ends with the socket
            pass
        return Answer(status, headers, data)


def build(
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body is not None:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


# Strategies

ENDPOINTS = [
    "/api/sse/messages",
    "/api/messages",
    "/api/sse/stats",
    "/metrics",
    "/healthz",
    "/readyz",
    "/",
    "/static/../api/sse/stats",
    "/api/sse/stats%0A",
    "/api/sse/messages/",
    "//api/sse/messages",
]
# Header names a test client controls itself: framing must stay valid to test the app.
RESERVED = {b"host", b"connection", b"content-length", b"transfer-encoding", b"upgrade", b"expect"}

texts = st.text(max_size=40)
ids = st.one_of(
    st.just(SESSION), st.just(ROBOT), st.just(""), texts, st.text(min_size=250, max_size=300)
)
last_event_ids = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(alphabet="0123456789", min_size=0, max_size=30),
    st.sampled_from(["", "-1", "abc", "１２３", "1e3", " 5", "0x10", "9" * 19, "9" * 20]),
    texts,
)
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80).map(
        lambda text: text.encode("latin-1")
    ),
    st.binary(max_size=80).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b"")),
)
header_names = st.one_of(
    st.sampled_from(
        [b"Last-Event-ID", b"Authorization", b"X-Forwarded-For", b"Origin", b"Accept", b"Cookie"]
    ),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).map(str.encode),
).filter(lambda name: name.lower() not in RESERVED)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
message_fields = ["sessionId", "content", "robotId", "isFromBot", "isHuman", "intent"]
message_bodies = st.one_of(
    st.fixed_dictionaries(
        {
            "sessionId": st.sampled_from([SESSION, "elsewhere"]),
            "content": st.one_of(st.just("fuzz"), texts, json_values),
        },
        optional={
            "robotId": st.one_of(st.just(ROBOT), ids, json_values),
            "isFromBot": st.one_of(st.booleans(), json_values),
            "isHuman": st.one_of(st.booleans(), json_values),
            "intent": st.one_of(texts, json_values),
        },
    ),
    st.dictionaries(st.sampled_from(message_fields) | texts, json_values, max_size=6),
    json_values,
).map(lambda value: json.dumps(value).encode())
bodies = st.one_of(message_bodies, st.binary(max_size=200), st.none())
valid_messages = st.fixed_dictionaries(
    {"sessionId": st.sampled_from([SESSION, "elsewhere"]), "content": st.text(min_size=1)},
    optional={
        "robotId": st.just(ROBOT),
        "isFromBot": st.booleans(),
        "isHuman": st.booleans(),
        "intent": st.text(max_size=20),
    },
).map(lambda value: json.dumps(value).encode())


@dataclass
class FuzzRequest:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    version: str
    bearer: str | None  # the kind of token sent as `Authorization: Bearer`, if any

    def raw(self) -> bytes:
        return build(self.method, self.target, self.headers, self.body, self.version)


PLAUSIBLE = [
    ("GET", "/api/sse/messages"),
    ("POST", "/api/messages"),
    ("POST", "/api/messages"),
    ("GET", "/api/sse/stats"),
    ("GET", "/metrics"),
    ("HEAD", "/api/sse/messages"),
    ("OPTIONS", "/api/messages"),
]
content_types = st.sampled_from(
    [b"application/json", b"application/json; charset=utf-8", b"APPLICATION/JSON", b"text/plain"]
)


@st.composite
def requests(draw: st.DrawFn) -> FuzzRequest:
    """Half plausible (a real endpoint, a real token as Bearer, JSON): they reach the
    handlers' success paths; half anything."""
    plausible = draw(st.booleans())
    if plausible:
        method, path = draw(st.sampled_from(PLAUSIBLE))
        names = st.sampled_from(["sessionId", "sessionId", "robotId", "lastEventId"])
        values = st.one_of(st.just(SESSION), st.just(ROBOT), ids, last_event_ids)
    else:
        method = draw(st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE"]))
        path = draw(
            st.one_of(
                st.sampled_from(ENDPOINTS),
                st.text(max_size=30).map(lambda text: "/" + quote(text, safe="/%")),
            )
        )
        names = st.sampled_from(["sessionId", "robotId", "lastEventId", "token"]) | texts
        values = st.one_of(ids, last_event_ids, st.sampled_from(list(TOKENS.values())))
    query = [
        quote(name, safe="") + "=" + quote(value, safe="")
        for name, value in draw(st.lists(st.tuples(names, values), max_size=4))
    ]
    raw_tail = "" if plausible else draw(st.sampled_from(["", "&%zz", "&x=%ff%fe", "&&=&"]))
    target = path + ("?" + "&".join(query) + raw_tail if query or raw_tail else "")

    headers: list[tuple[bytes, bytes]] = []
    bearer = None
    kinds = [None, *TOKENS] + (["publisher", "publisher_star"] * 3 if plausible else [])
    kind = draw(st.sampled_from(kinds))
    if kind is not None:
        token = TOKENS[kind].encode()
        where = "header" if plausible else draw(st.sampled_from(["header", "query"]))
        if where == "query":
            target += ("&" if "?" in target else "?") + "token=" + TOKENS[kind]
        else:
            scheme = (
                b"Bearer " if plausible else draw(st.sampled_from([b"Bearer ", b"Basic ", b""]))
            )
            headers.append((b"Authorization", scheme + token))
            bearer = kind if scheme == b"Bearer " else None
    if draw(st.booleans()):
        headers.append((b"Last-Event-ID", draw(last_event_ids).encode("utf-8", "replace")))
    if method == "POST" or draw(st.booleans()):
        kinds = st.just(b"application/json") if plausible else content_types | header_values
        headers.append((b"Content-Type", draw(kinds)))
    if draw(st.booleans()):
        headers.append((b"Origin", draw(st.sampled_from(ORIGINS) | header_values)))
    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=3))
    if plausible:
        body = draw(valid_messages | message_bodies) if method == "POST" else None
    else:
        body = draw(bodies) if method in ("POST", "PUT") or draw(st.booleans()) else None
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"]))
    return FuzzRequest(method, target, headers, body, version, bearer)


def _max_id(database: Database) -> int:
    return int(database.query("SELECT coalesce(max(id), 0) FROM messages")[0][0])


def _new_rows(database: Database, after: int) -> list[tuple[Any, ...]]:
    return database.query("SELECT id, session_id FROM messages WHERE id > %s", (after,))


def _check(answer: Answer, raw: bytes) -> None:
    event(f"status {answer.status}")  # the spread shows with --hypothesis-show-statistics
    assert answer.status < 500, f"{answer.status} for {raw[:300]!r}: {answer.body[:300]!r}"


def _bearer(kind: str) -> tuple[bytes, bytes]:
    return (b"Authorization", b"Bearer " + TOKENS[kind].encode())


JSON = (b"Content-Type", b"application/json")
MESSAGE = json.dumps({"sessionId": SESSION, "content": "pinned"}).encode()
ELSEWHERE = json.dumps({"sessionId": "elsewhere", "content": "pinned"}).encode()
STREAM = f"/api/sse/messages?sessionId={SESSION}"


@FUZZ_SETTINGS
@given(request=requests())
# Pinned examples, so the success paths are always among those run:
@example(
    FuzzRequest(
        "POST", "/api/messages", [_bearer("publisher"), JSON], MESSAGE, "HTTP/1.1", "publisher"
    )
)
@example(
    FuzzRequest("POST", "/api/messages", [_bearer("reader"), JSON], MESSAGE, "HTTP/1.1", "reader")
)
@example(
    FuzzRequest(
        "POST", "/api/messages", [_bearer("publisher"), JSON], ELSEWHERE, "HTTP/1.1", "publisher"
    )
)
@example(
    FuzzRequest(
        "GET", STREAM, [_bearer("reader"), (b"Last-Event-ID", b"0")], None, "HTTP/1.1", "reader"
    )
)
@example(FuzzRequest("GET", f"{STREAM}&token={TOKENS['reader']}", [], None, "HTTP/1.0", None))
@example(FuzzRequest("HEAD", STREAM, [_bearer("reader")], None, "HTTP/1.1", "reader"))
def test_arbitrary_requests_never_fail_hang_or_write_without_a_right(
    fuzzed: Fuzzed, request: FuzzRequest
) -> None:
    raw = request.raw()
    before = _max_id(fuzzed.database)
    answer = exchange(fuzzed.port, raw, request.method)
    _check(answer, raw)
    rows = _new_rows(fuzzed.database, before)
    if answer.status == 201:
        assert request.bearer in ("publisher", "publisher_star"), raw[:300]
        assert len(rows) == 1
        assert request.bearer == "publisher_star" or rows[0][1] == SESSION
    else:
        assert rows == [], f"{answer.status} wrote {rows} for {raw[:300]!r}"


def _sign(secret: str, header: bytes, payload: bytes) -> str:
    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    signing_input = b64(header) + b"." + b64(payload)
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    token = (signing_input + b"." + b64(signature)).decode()
    remember(token)
    return token


VALID_EXP = int(time.time()) + 3600
claims = st.one_of(
    st.fixed_dictionaries(
        {"exp": st.one_of(st.just(VALID_EXP), st.just(VALID_EXP), st.integers(), json_values)},
        optional={
            "sessions": st.one_of(st.just("*"), st.just([SESSION]), json_values),
            "robots": st.one_of(st.just("*"), st.just([ROBOT]), json_values),
            "publish": st.one_of(st.just(True), st.booleans(), json_values),
            "iat": st.one_of(st.integers(), json_values),
            "nbf": st.one_of(st.integers(), json_values),
            "aud": json_values,
        },
    ),
    json_values,
)
jose_headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["HS256", "HS256", "HS256", "none", "HS512", "RS256", ""])},
    optional={"typ": json_values, "kid": json_values, "crit": json_values, "b64": json_values},
)


def _allows_writing(payload: Any, header: Any) -> bool:
    """What a token must carry, at least, to publish to SESSION without a robotId."""
    if header.get("alg") != "HS256" or not isinstance(payload, dict):
        return False
    sessions = payload.get("sessions", [])
    exp = payload.get("exp")
    return (
        payload.get("publish") is True
        and (sessions == "*" or (isinstance(sessions, list) and SESSION in sessions))
        and payload.get("robots", "*") == "*"
        and isinstance(exp, int | float)
        and exp > time.time()
    )


@FUZZ_SETTINGS
@given(
    payload=claims,
    header=jose_headers,
    raw_payload=st.none() | st.binary(max_size=60),
    stream=st.booleans(),
)
@example(
    payload={"sessions": "*", "publish": True, "exp": VALID_EXP},
    header={"alg": "HS256"},
    raw_payload=None,
    stream=False,
)
@example(
    payload={"sessions": [SESSION], "exp": VALID_EXP},
    header={"alg": "HS256"},
    raw_payload=None,
    stream=True,
)
def test_signed_tokens_with_arbitrary_claims_are_refused_cleanly(
    fuzzed: Fuzzed, payload: Any, header: dict[str, Any], raw_payload: bytes | None, stream: bool
) -> None:
    encoded = raw_payload if raw_payload is not None else json.dumps(payload).encode()
    token = _sign(SECRET, json.dumps(header).encode(), encoded)
    before = _max_id(fuzzed.database)
    if stream:
        raw = build("GET", f"/api/sse/messages?sessionId={SESSION}&token={token}", [], None)
        answer = exchange(fuzzed.port, raw, "GET")
    else:
        body = json.dumps({"sessionId": SESSION, "content": "signed fuzz"}).encode()
        headers = [(b"Authorization", b"Bearer " + token.encode())]
        headers.append((b"Content-Type", b"application/json"))
        raw = build("POST", "/api/messages", headers, body)
        answer = exchange(fuzzed.port, raw, "POST")
    _check(answer, raw)
    assert answer.status in (200, 201, 401, 403), answer.body
    rows = _new_rows(fuzzed.database, before)
    if answer.status == 201:
        assert raw_payload is None and _allows_writing(payload, header), (header, payload)
        assert len(rows) == 1
    else:
        assert rows == []


def _socket_count(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except OSError:
            pass  # closed while listing
    return count


def test_after_the_fuzz_nothing_is_left_open(fuzzed: Fuzzed) -> None:
    """Runs after the fuzz tests (file order): streams, per-client slots and sockets."""
    broker = fuzzed.broker
    assert broker.process is not None

    def stats() -> dict[str, Any]:
        raw = build(
            "GET",
            "/api/sse/stats",
            [(b"Authorization", b"Bearer " + ADMIN_TOKEN.encode())],
            None,
        )
        answer = exchange(fuzzed.port, raw, "GET")
        assert answer.status == 200, answer.body
        data: dict[str, Any] = json.loads(answer.body)["data"]
        return data

    broker.wait_until(lambda: stats()["totalConnections"] == 0, 10, "streams closed")
    # Every per-client slot was released: one address can still open CAP streams.
    streams = []
    try:
        for _ in range(CAP):
            sock = socket.create_connection(("127.0.0.1", fuzzed.port), timeout=READ_TIMEOUT)
            streams.append(sock)
            target = f"/api/sse/messages?sessionId={SESSION}&token={TOKENS['reader']}"
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 "), "a per-client slot leaked"
    finally:
        for sock in streams:
            sock.close()
    broker.wait_until(lambda: stats()["totalConnections"] == 0, 10, "streams closed")
    # Sockets: the listener, the pool, and no client connection left behind.
    baseline = 2 + 10  # listening socket + LISTEN connection + a pool of at most 10
    broker.wait_until(
        lambda: _socket_count(broker.process.pid) <= baseline,  # type: ignore[union-attr]
        10,
        f"broker sockets back to at most {baseline}",
    )
