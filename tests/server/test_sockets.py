"""broker.server.sockets in process: the listening sockets bound on this machine's real network
stack, and each failure to bind as one `ConfigError` naming the setting to change."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from broker.config.settings import Settings
from broker.errors import ConfigError
from broker.server.sockets import listen_sockets
from tests.support.processes import free_port


@contextmanager
def bound(settings: Settings) -> Iterator[list[socket.socket]]:
    sockets = listen_sockets(settings)
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_the_public_socket_alone_without_an_admin_port() -> None:
    port = free_port()
    with bound(Settings(host="127.0.0.1", port=port)) as sockets:
        assert [sock.getsockname() for sock in sockets] == [("127.0.0.1", port)]


def test_the_admin_socket_takes_the_public_host_unless_given_its_own() -> None:
    port, admin = free_port(), free_port()
    with bound(Settings(host="127.0.0.1", port=port, admin_port=admin)) as sockets:
        assert [sock.getsockname() for sock in sockets] == [
            ("127.0.0.1", port),
            ("127.0.0.1", admin),
        ]
    settings = Settings(host="0.0.0.0", port=port, admin_port=admin, admin_host="127.0.0.1")
    with bound(settings) as sockets:
        assert [sock.getsockname() for sock in sockets] == [("0.0.0.0", port), ("127.0.0.1", admin)]


def test_a_busy_port_names_broker_port(busy_port: int) -> None:
    with pytest.raises(ConfigError, match=f"^invalid BROKER_PORT={busy_port}: another process"):
        listen_sockets(Settings(host="127.0.0.1", port=busy_port))


def test_a_busy_admin_port_names_it_and_gives_the_public_port_back(busy_port: int) -> None:
    port = free_port()
    with pytest.raises(ConfigError, match=f"^invalid BROKER_ADMIN_PORT={busy_port}: another"):
        listen_sockets(Settings(host="127.0.0.1", port=port, admin_port=busy_port))
    with socket.socket() as again:  # the public socket was closed, not leaked
        again.bind(("127.0.0.1", port))
        again.listen()


@pytest.mark.parametrize(
    ("host", "admin_host", "message"),
    [
        ("999.1.1.1", None, r"^invalid BROKER_HOST='999\.1\.1\.1': cannot resolve"),
        ("192.0.2.1", None, r"^invalid BROKER_HOST='192\.0\.2\.1': not an address"),
        ("127.0.0.1", "192.0.2.1", r"^invalid BROKER_ADMIN_HOST='192\.0\.2\.1': not an address"),
    ],
    ids=["unresolvable", "foreign", "foreign-admin-host"],
)
def test_a_host_this_machine_lacks_names_the_host_setting(
    host: str, admin_host: str | None, message: str
) -> None:
    settings = Settings(
        host=host,
        port=free_port(),
        admin_port=None if admin_host is None else free_port(),
        admin_host=admin_host,
    )
    with pytest.raises(ConfigError, match=message) as caught:
        listen_sockets(settings)
    assert "\n" not in str(caught.value)
