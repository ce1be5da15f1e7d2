"""broker.web.auth and the auth settings, no I/O: which tokens verify, what a grant covers, the
bearer header, and secrets never echoed. What a token lets its bearer read and write on a real
broker: tests/system/test_auth.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from broker.config.settings import Settings
from broker.errors import ConfigError, Forbidden, Unauthorized
from broker.web.auth import MAX_TOKEN_SECONDS, OPEN, Authenticator, authorize_feed, bearer
from tests.support.security import (
    mint,
    new_secret,
    remember,
    unsigned,
)


def test_a_short_secret_is_refused_without_being_echoed() -> None:
    secret = "s3cr3t-but-short"
    with pytest.raises(ConfigError) as raised:
        Settings.load({"BROKER_AUTH_SECRET": secret})
    message = str(raised.value)
    assert message.startswith("invalid BROKER_AUTH_SECRET=")
    assert secret not in message and "32 bytes" in message


def test_an_admin_token_is_never_echoed() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.load({"BROKER_ADMIN_TOKEN": "short-token"})
    assert "short-token" not in str(raised.value)
    assert str(raised.value).startswith("invalid BROKER_ADMIN_TOKEN=")


def test_secrets_stay_out_of_the_settings_repr() -> None:
    secret = new_secret()
    settings = Settings.load({"BROKER_AUTH_SECRET": secret, "BROKER_ADMIN_TOKEN": "a" * 20})
    assert settings.auth_secret == (secret,)
    assert secret not in repr(settings) and "a" * 20 not in repr(settings)


def test_wildcard_cors_is_refused_when_auth_is_on() -> None:
    assert Settings.load({"BROKER_CORS_ORIGINS": "*"}).cors_origins == ("*",)
    with pytest.raises(ConfigError, match=r"BROKER_CORS_ORIGINS='\*'.*BROKER_AUTH_SECRET"):
        Settings.load({"BROKER_CORS_ORIGINS": "*", "BROKER_AUTH_SECRET": new_secret()})


def test_verify_accepts_every_listed_secret_and_nothing_else() -> None:
    new, old, stranger = new_secret(), new_secret(), new_secret()
    authenticator = Authenticator([new, old])
    assert authenticator.verify(mint(old, ["a"])).sessions == frozenset({"a"})
    assert authenticator.verify(mint(new, "*")).sessions is None
    with pytest.raises(Unauthorized, match="signature"):
        authenticator.verify(mint(stranger, ["a"]))


def _signed(secret: str, **claims: Any) -> str:
    """A token with exactly these claims besides `sessions: "*"`, types unchecked."""
    token = jwt.encode({"sessions": "*", "exp": 2**40, **claims}, secret, algorithm="HS256")
    remember(token)
    return token


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s: unsigned("*"), "malformed"),
        (lambda s: mint(s, "*", algorithm="HS512"), "malformed"),
        (lambda s: mint(s, "*", ttl=-60), "expired"),
        (lambda s: jwt.encode({"sessions": "*"}, s, algorithm="HS256"), "exp"),
        (lambda s: mint(s, "**"), "sessions"),
        (lambda s: mint(s, [1, 2]), "sessions"),
        (lambda s: mint(s, ["a"], robots={"r": 1}), "robots"),
        (lambda s: mint(s, ["a"], publish="yes"), "publish"),
        (lambda s: mint(s, "*", aud="some-other-service"), "aud"),
        (lambda s: mint(s, "*", aud=""), "aud"),
        (lambda s: mint(s, "*", aud=[]), "aud"),
        (lambda s: _signed(s, exp="99999999999"), "exp must be a number"),
        (lambda s: _signed(s, iat="0"), "iat must be a number"),
        (lambda s: _signed(s, nbf="0"), "nbf must be a number"),
        (lambda s: "not.a.token", "malformed"),
        (lambda s: "", "malformed"),
        (lambda s: mint(s, "*", feeds=["orders"]), "claim feeds must be an object"),
        (lambda s: mint(s, "*", feeds="*"), "claim feeds must be an object"),
        (lambda s: mint(s, "*", feeds={"orders": "42"}), "claim feeds must be an object"),
        (lambda s: mint(s, "*", feeds={"orders": [42]}), "claim feeds must be an object"),
        (lambda s: mint(s, "*", feeds={"orders": None}), "claim feeds must be an object"),
        (lambda s: mint(s, "*", feeds={"messages": "*"}), "sessions and robots scope it"),
    ],
    ids=[
        "alg-none",
        "hs512",
        "expired",
        "no-exp",
        "bad-sessions",
        "sessions-ints",
        "bad-robots",
        "bad-publish",
        "audience",
        "audience-empty",
        "audience-empty-list",
        "exp-string",
        "iat-string",
        "nbf-string",
        "garbage",
        "empty",
        "feeds-list",
        "feeds-star",
        "feeds-key-string",
        "feeds-key-ints",
        "feeds-key-null",
        "feeds-messages",
    ],
)
def test_verify_refuses_bad_tokens(make: Callable[[str], str], reason: str) -> None:
    secret = new_secret(64)  # long enough for HS512 too: refused for its algorithm alone
    with pytest.raises(Unauthorized, match=reason):
        Authenticator([secret]).verify(make(secret))


def test_grants_cover_exactly_their_scope() -> None:
    secret = new_secret()
    verify = Authenticator([secret]).verify
    reader = verify(mint(secret, ["a"], robots=["r1"]))
    reader.check_read("a", "r1")
    for session, robot in [("b", "r1"), ("a", None), ("a", "r2"), (None, "r1")]:
        with pytest.raises(Forbidden):
            reader.check_read(session, robot)
    with pytest.raises(Forbidden, match="publishing"):
        reader.check_publish()
    everything = verify(mint(secret, "*"))
    everything.check_read(None, None)
    writer = verify(mint(secret, ["a"], publish=True))
    writer.check_write("a", None)
    writer.check_write("a", "any-robot")
    with pytest.raises(Forbidden):
        writer.check_write("b", None)
    # Claims left out: no session at all, every robot, no publishing.
    bare = verify(mint(secret, [], robots=None))
    assert (bare.sessions, bare.robots, bare.publish) == (frozenset(), None, False)


@pytest.mark.parametrize(
    ("header", "token"),
    [(None, None), ("Bearer abc", "abc"), ("bearer  abc ", "abc"), (" BEARER abc", "abc")],
)
def test_bearer_reads_the_token_of_an_authorization_header(
    header: str | None, token: str | None
) -> None:
    assert bearer(header) == token


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer  ", "Basic abc", "abc", "Token abc"])
def test_bearer_refuses_any_other_authorization(header: str) -> None:
    with pytest.raises(Unauthorized, match="Bearer <token>"):
        bearer(header)


@pytest.mark.parametrize("exp", [10**400, 1e300, float("nan"), "a year and a day"])
def test_exp_further_than_a_year_is_refused(exp: Any) -> None:
    secret = new_secret()
    if exp == "a year and a day":
        exp = int(time.time()) + MAX_TOKEN_SECONDS + 86_400
    with pytest.raises(Unauthorized):
        Authenticator([secret]).verify(_signed(secret, exp=exp))
    a_year = _signed(secret, exp=int(time.time()) + MAX_TOKEN_SECONDS - 60)
    assert Authenticator([secret]).verify(a_year).valid_until is not None


def test_the_feeds_claim_scopes_key_values_per_feed() -> None:
    secret = new_secret()
    grant = Authenticator([secret]).verify(
        mint(secret, ["s1"], feeds={"orders": ["42", "44"], "tickets": "*"})
    )
    assert grant.feed_keys("orders") == frozenset({"42", "44"})
    assert grant.feed_keys("tickets") is None  # every key
    assert grant.feed_keys("invoices") == frozenset()  # not named: nothing
    assert grant.feed_keys("messages") == frozenset({"s1"})  # sessions scope messages
    assert authorize_feed(grant, "orders", ["42"]) is None
    assert authorize_feed(grant, "orders", ["42", "44"]) is None
    assert authorize_feed(grant, "orders", ["43"]) == "token does not allow this key of feed orders"
    assert authorize_feed(grant, "orders", ["42", "43"]) is not None
    assert "global stream of feed orders" in (authorize_feed(grant, "orders", []) or "")
    assert authorize_feed(grant, "tickets", []) is None
    assert authorize_feed(grant, "invoices", ["1"]) == "token does not allow feed invoices"
    with pytest.raises(Forbidden, match="key of feed orders"):
        grant.check_feed("orders", ["43"])
    grant.check_feed("orders", ["44"])


def test_a_token_without_the_feeds_claim_reads_no_other_feed() -> None:
    """Least privilege: tokens minted before feeds existed, `sessions: "*"` ones included,
    were meant for messages; they open no orders, which may hold anything."""
    secret = new_secret()
    everything_of_messages = Authenticator([secret]).verify(mint(secret, "*"))
    assert everything_of_messages.feed_keys("orders") == frozenset()
    assert authorize_feed(everything_of_messages, "orders", []) is not None
    assert authorize_feed(everything_of_messages, "messages", []) is None
    # Open mode (no secret) grants every feed and key.
    assert OPEN.feed_keys("orders") is None and authorize_feed(OPEN, "orders", []) is None


def test_messages_through_authorize_feed_keeps_the_robots_scope() -> None:
    secret = new_secret()
    verify = Authenticator([secret]).verify
    one_robot = verify(mint(secret, "*", robots=["r1"]))
    assert "robotId" in (authorize_feed(one_robot, "messages", ["s1"]) or "")
    assert authorize_feed(verify(mint(secret, ["s1"])), "messages", ["s2"]) is not None


def test_minted_feeds_claims_verify_to_the_same_scope() -> None:
    authenticator = Authenticator([new_secret()])
    token = authenticator.mint([], feeds={"orders": ["42", "43"], "tickets": "*"})
    grant = authenticator.verify(token)
    assert grant.feeds == {"orders": frozenset({"42", "43"}), "tickets": None}
    assert grant.sessions == frozenset()
    assert authenticator.verify(authenticator.mint(["a"])).feeds == {}
