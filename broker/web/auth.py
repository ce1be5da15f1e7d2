"""Signed subscription tokens: who may read which sessions and robots, and who may publish.

A token is a JWT signed with HS256 by one of the secrets of `BROKER_AUTH_SECRET` (the first
signs, every one verifies, so a secret can be rotated without cutting anyone off). Its claims:

    sessions  list of session ids, or "*" for every session (needed by the global stream)
    robots    list of robot ids, or "*" (the default) for every robot
    publish   true to allow `POST /api/messages` within the same sessions and robots
    feeds     the other feeds (config/feeds.py) and, per feed, the key values the bearer may
              read: `{"orders": ["42"], "tickets": "*"}`; "*" is every key, and the feed's
              global stream (no key) needs it. A feed it does not name, or a token without
              the claim, reads nothing of that feed; `messages` is scoped by `sessions` and
              `robots` alone, so the claim may not name it (`Grant.feed_keys`)
    exp       expiry, seconds since the epoch (required, a number, at most
              `MAX_TOKEN_SECONDS` ahead); a stream opened with the token ends when it expires
              (`Grant.valid_until`)
    aud       refused whatever its value: the broker is no token's audience

With no secret configured the broker runs open: `Authenticator.authenticate` grants
everything. The token itself is never logged; `fingerprint` gives the first 8 hex digits of its
SHA-256, which is bound to the request's log lines as `token`.

Failures raise `Unauthorized` (401: missing, malformed, expired, wrong signature, bad claims)
or `Forbidden` (403: a valid token that does not cover the request), whose messages are fixed
strings that never quote the token.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt
import structlog
from starlette.requests import Request

from ..config.feeds import MESSAGES
from ..errors import ConfigError, Forbidden, Unauthorized
from ..log import Refusals

__all__ = [
    "ALGORITHM",
    "MAX_TOKEN_SECONDS",
    "OPEN",
    "Authenticator",
    "Grant",
    "authenticate",
    "authorize_feed",
    "bearer",
    "fingerprint",
]

ALGORITHM = "HS256"
LEEWAY_SECONDS = 5  # clock skew between the app backend that mints and this broker
MAX_CLAIM_ITEMS = 1000
# The furthest `exp` accepted, from now: a year. A token is a bearer secret that only rotating
# BROKER_AUTH_SECRET revokes, so one that never expires must not exist; and an `exp` past the
# float range (`1e400` as an integer) made the stream's timer raise, a 500 that left the
# subscription counted for good. Mint short-lived tokens; a stream outlives none.
MAX_TOKEN_SECONDS = 366 * 24 * 3600
FEEDS_CLAIM = 'token claim feeds must be an object of feed names to "*" or a list of strings'

FeedScopes = Mapping[str, frozenset[str] | None]
NO_FEEDS: FeedScopes = MappingProxyType({})

log = structlog.get_logger(logger_name=__name__)
refusals = Refusals(log)  # log.py: at a bounded rate


def fingerprint(token: str) -> str:
    """A short, stable, non-reversible name for a token, safe to log."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request may do. `None` for sessions or robots means every one ("*").

    `feeds` maps each other feed the token names to its key values (`None`: every key);
    `None` for `feeds` itself means every feed and every key (open mode). The default is no
    other feed: a grant reads only what it was given."""

    sessions: frozenset[str] | None
    robots: frozenset[str] | None
    publish: bool
    token: str | None = None  # the fingerprint, for logs
    # When the token stops being accepted (exp plus the clock-skew leeway), epoch seconds.
    valid_until: float | None = None
    feeds: FeedScopes | None = field(default_factory=lambda: NO_FEEDS, hash=False)

    def feed_keys(self, feed: str) -> frozenset[str] | None:
        """The key values of `feed` this grant may read; `None`: every key (and the feed's
        global stream); empty: none. The messages feed's keys are its sessions."""
        if feed == MESSAGES:
            return self.sessions
        if self.feeds is None:
            return None
        return self.feeds.get(feed, frozenset())

    def check_feed(self, feed: str, keys: Iterable[str]) -> None:
        """Allow a stream of `feed` for the key values `keys` (none: the global stream), or
        403 (`authorize_feed`)."""
        refusal = authorize_feed(self, feed, keys)
        if refusal is not None:
            raise _forbidden(refusal)

    def check_read(self, session_id: str | None, robot_id: str | None) -> None:
        """Allow a stream of `session_id` (None: global) narrowed to `robot_id`, or 403."""
        if session_id is None and self.sessions is not None:
            raise _forbidden('token does not allow the global stream: it needs sessions "*"')
        if session_id is not None and not _covers(self.sessions, session_id):
            raise _forbidden("token does not allow this sessionId")
        if robot_id is None and self.robots is not None:
            raise _forbidden("token allows only some robots: give a robotId it lists")
        if robot_id is not None and not _covers(self.robots, robot_id):
            raise _forbidden("token does not allow this robotId")

    def check_publish(self) -> None:
        """Allow publishing at all, or 403 (before the body is read)."""
        if not self.publish:
            raise _forbidden("token does not allow publishing")

    def check_write(self, session_id: str, robot_id: str | None) -> None:
        """Allow one new message in `session_id` from `robot_id`, or 403."""
        self.check_publish()
        if not _covers(self.sessions, session_id):
            raise _forbidden("token does not allow publishing to this sessionId")
        if self.robots is not None and (robot_id is None or robot_id not in self.robots):
            raise _forbidden("token does not allow publishing as this robotId")


OPEN = Grant(sessions=None, robots=None, publish=True, feeds=None)


def authorize_feed(grant: Grant, feed: str, keys: Iterable[str]) -> str | None:
    """Why `grant` may not stream `feed` for the key values `keys`, or None if it may.

    No key is the feed's global stream, which needs every key ("*"). The messages feed is
    checked as `Grant.check_read` does with no robotId: a token listing robots reads it only
    on `/api/sse/messages` with one of them. The message is fixed text and the feed's name
    (a declared one: the route checks it first), never a key value or the token."""
    allowed = grant.feed_keys(feed)
    wanted = list(keys)
    if feed == MESSAGES and grant.robots is not None:
        return "token allows only some robots: give a robotId it lists"
    if allowed is None:
        return None
    if not allowed:
        return f"token does not allow feed {feed}"
    if not wanted:
        return f'token does not allow the global stream of feed {feed}: it needs "*"'
    if any(key not in allowed for key in wanted):
        return f"token does not allow this key of feed {feed}"
    return None


def _forbidden(message: str) -> Forbidden:
    refusals.info("auth_forbidden", message)  # `token` (the fingerprint) is bound already
    return Forbidden(message)


def _covers(allowed: frozenset[str] | None, value: str) -> bool:
    return allowed is None or value in allowed


class Authenticator:
    """Verifies and mints tokens with the configured secrets; open when there are none."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self.secrets = tuple(secrets)

    @property
    def enabled(self) -> bool:
        return bool(self.secrets)

    def mint(
        self,
        sessions: Iterable[str] | str,
        robots: Iterable[str] | str = "*",
        publish: bool = False,
        ttl_seconds: float = 3600,
        now: float | None = None,
        feeds: Mapping[str, Iterable[str] | str] | None = None,
    ) -> str:
        """A token signed with the first secret; `feeds` (feed name -> key values or "*")
        is its `feeds` claim, left out when None. Raises `ConfigError` with no secret."""
        if not self.secrets:
            raise ConfigError("BROKER_AUTH_SECRET is not set: there is no secret to sign with")
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "sessions": _listed(sessions),
            "robots": _listed(robots),
            "publish": publish,
            "iat": issued,
            "exp": issued + int(ttl_seconds),
        }
        if feeds is not None:
            claims["feeds"] = {name: _listed(keys) for name, keys in feeds.items()}
        return jwt.encode(claims, self.secrets[0], algorithm=ALGORITHM)

    def verify(self, token: str) -> Grant:
        """The grant a token carries. Raises `Unauthorized` for anything but a valid token."""
        claims = self._decode(token)
        return Grant(
            sessions=_scope(claims, "sessions", default=[]),
            robots=_scope(claims, "robots", default="*"),
            publish=_flag(claims, "publish"),
            token=fingerprint(token),
            valid_until=claims["exp"] + LEEWAY_SECONDS,
            feeds=_feeds(claims),
        )

    def _decode(self, token: str) -> dict[str, Any]:
        for secret in self.secrets:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    secret,
                    algorithms=[ALGORITHM],  # never "none", never an algorithm the token picks
                    # Any aud is refused below, whatever its value (PyJWT ignores an empty one).
                    options={"require": ["exp"], "verify_aud": False},
                    leeway=LEEWAY_SECONDS,
                )
            except jwt.InvalidSignatureError:
                continue  # maybe signed with another of the secrets
            except jwt.ExpiredSignatureError:
                raise Unauthorized("token expired") from None
            except jwt.MissingRequiredClaimError:
                raise Unauthorized("token has no exp claim") from None
            except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
                raise Unauthorized("token malformed") from None
            if not isinstance(claims, dict):
                raise Unauthorized("token malformed")
            _check_registered(claims)
            return claims
        raise Unauthorized("token signature invalid")

    def authenticate(self, request: Request, *, query: bool) -> Grant:
        """The grant of the request's token: from `Authorization: Bearer`, or (when `query`)
        from the `token` query parameter, which `EventSource` needs since it cannot send
        headers. Open mode grants everything. Raises `Unauthorized`."""
        if not self.enabled:
            return OPEN
        token: str | None = None
        try:
            token = bearer(request.headers.get("authorization"))
            if token is None and query:
                token = request.query_params.get("token") or None
            if token is None:
                where = "Authorization: Bearer <token> or ?token=" if query else "Authorization"
                raise Unauthorized(f"token required: {where}")
            grant = self.verify(token)
        except Unauthorized as exc:
            refusals.info(
                "auth_refused",
                str(exc),
                token=None if token is None else fingerprint(token),
                path=request.scope.get("path"),
            )
            raise
        structlog.contextvars.bind_contextvars(token=grant.token)
        return grant


def authenticate(request: Request, *, query: bool = False) -> Grant:
    """The grant of `request` under the app's `Authenticator` (`app.state.auth`)."""
    authenticator: Authenticator = request.app.state.auth
    return authenticator.authenticate(request, query=query)


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None without the header.
    Raises `Unauthorized` for any other form."""
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization must be: Bearer <token>")
    return value.strip()


def _check_registered(claims: dict[str, Any]) -> None:
    """Refuse an `aud`, time claims that are not numbers (PyJWT takes `"99999999999"`), and
    an `exp` more than `MAX_TOKEN_SECONDS` ahead."""
    if "aud" in claims:
        raise Unauthorized("token has an aud claim: the broker accepts none")
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Unauthorized(f"token claim {name} must be a number")
    if not claims["exp"] <= time.time() + MAX_TOKEN_SECONDS:  # NaN fails it too
        raise Unauthorized("token claim exp must be at most a year ahead")


def _scope(claims: dict[str, Any], name: str, default: Any) -> frozenset[str] | None:
    value = claims.get(name, default)
    if value == "*":
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_CLAIM_ITEMS
        or not all(isinstance(item, str) for item in value)
    ):
        raise Unauthorized(f'token claim {name} must be "*" or a list of strings')
    return frozenset(value)


def _feeds(claims: dict[str, Any]) -> FeedScopes:
    """The `feeds` claim; missing: no other feed. `messages` may not be named in it: its
    scope is `sessions` and `robots`, and a second one would leave a reader guessing which
    of the two counts."""
    value = claims.get("feeds", {})
    if not isinstance(value, dict) or len(value) > MAX_CLAIM_ITEMS:
        raise Unauthorized(FEEDS_CLAIM)
    if MESSAGES in value:
        raise Unauthorized("token claim feeds may not name messages: sessions and robots scope it")
    scopes: dict[str, frozenset[str] | None] = {}
    for name, keys in value.items():
        if keys == "*":
            scopes[name] = None
        elif (
            isinstance(keys, list)
            and len(keys) <= MAX_CLAIM_ITEMS
            and all(isinstance(key, str) for key in keys)
        ):
            scopes[name] = frozenset(keys)
        else:
            raise Unauthorized(FEEDS_CLAIM)
    return MappingProxyType(scopes)


def _listed(values: Iterable[str] | str) -> list[str] | str:
    """A claim's value: "*" as it is, anything else as a list."""
    return values if isinstance(values, str) else list(values)


def _flag(claims: dict[str, Any], name: str) -> bool:
    value = claims.get(name, False)
    if not isinstance(value, bool):
        raise Unauthorized(f"token claim {name} must be true or false")
    return value
