"""broker.errors: the broker's exceptions, their fields and their tree. How each becomes an
HTTP answer is answers.py's (tests/web/test_answers.py)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest

import broker
from broker import errors
from broker.errors import (
    AtCapacity,
    BrokerError,
    ConfigError,
    Forbidden,
    RequestError,
    TooManyStreams,
    Unauthorized,
    Unavailable,
)
from broker.store import DatabaseUnavailable


def test_every_error_is_a_broker_error_in_the_documented_tree() -> None:
    for kind in (ConfigError, RequestError, Unauthorized, Forbidden, TooManyStreams):
        assert issubclass(kind, BrokerError) and not issubclass(kind, Unavailable)
    assert issubclass(Unavailable, BrokerError)
    assert issubclass(AtCapacity, Unavailable) and issubclass(DatabaseUnavailable, Unavailable)


def test_the_tree_names_every_exception_the_broker_defines() -> None:
    """Wherever an exception is defined in broker/, errors.py's drawing names it, under its
    base."""
    defined: dict[str, type[BaseException]] = {}
    for module in pkgutil.walk_packages(broker.__path__, "broker."):
        if module.name.endswith("__main__"):
            continue
        for name, kind in inspect.getmembers(importlib.import_module(module.name)):
            if (
                inspect.isclass(kind)
                and issubclass(kind, BaseException)
                and kind.__module__.startswith("broker.")
            ):
                defined[name] = kind
    tree = errors.__doc__ or ""
    assert "BusDown" in defined and "BadSignature" in defined  # the walk finds them
    for name, kind in defined.items():
        drawn = re.search(rf"^[ │├└─]*{name}\b", tree, re.MULTILINE)
        assert drawn, f"{name} ({kind.__module__}) is not in errors.py's tree"
        base = kind.__bases__[0]
        assert base is Exception or re.search(rf"^[ │├└─]*{base.__name__}\b", tree, re.M)


def test_a_request_error_carries_the_status_its_check_chose() -> None:
    error = RequestError(413, "body must be at most 1048576 bytes")
    assert error.status == 413 and str(error) == "body must be at most 1048576 bytes"


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [
        (TooManyStreams("too many streams"), 5),
        (TooManyStreams("too many streams", retry_after=9), 9),
        (Unavailable("listener not connected"), 1),
        (Unavailable("listener not connected", retry_after=3), 3),
        (AtCapacity("too many connections: retry later"), 1),
        (DatabaseUnavailable(OSError("refused")), 2),
    ],
)
def test_errors_a_client_should_retry_say_when(
    error: TooManyStreams | Unavailable, retry_after: int
) -> None:
    assert error.retry_after == retry_after


def test_database_unavailable_names_the_cause_kind_but_not_its_text() -> None:
    """The cause's text may hold a host or user name; only its kind reaches the client."""
    error = DatabaseUnavailable(OSError("connection to 10.1.2.3 user=alice refused"))
    assert str(error) == "database unavailable: OSError"


def test_the_core_errors_carry_no_http() -> None:
    for error in (AtCapacity("x"), DatabaseUnavailable(OSError()), Forbidden("x")):
        assert not hasattr(error, "status") and not hasattr(error, "headers")
