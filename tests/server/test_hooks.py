"""broker.server.hooks: the uvicorn installed has every hook the protocol relies on, a missing
one is named, and the tested range is the pinned one."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import uvicorn

from broker.server import hooks as uvicorn_hooks
from broker.server.hooks import TESTED_UVICORN, check_uvicorn


def test_uvicorn_has_every_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    check_uvicorn()
    protocol = uvicorn_hooks.HttpToolsProtocol
    hooks = {"on_headers_complete": "here", "self.gone": "broker/server/protocol.py"}
    monkeypatch.setitem(uvicorn_hooks.UVICORN_HOOKS, protocol, hooks)
    with pytest.raises(
        RuntimeError, match=r"has no HttpToolsProtocol\.gone, which broker/server/protocol"
    ):
        check_uvicorn()


def test_a_changed_line_of_uvicorn_that_a_module_relies_on_is_named_with_the_module(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sink's chunk framing, the stream's drain and the runner's signal are lines of uvicorn's
    source, not names: a release that changes one is refused too."""
    server = uvicorn.Server
    runner = "broker/server/runner.py"
    hooks = {"handle_exit": runner, "code: signal.raise_signal(sig)": runner}
    monkeypatch.setitem(uvicorn_hooks.UVICORN_HOOKS, server, hooks)
    with pytest.raises(
        RuntimeError, match=r"Server\.code: signal.*, which broker/server/runner\.py"
    ):
        check_uvicorn()


def test_the_tested_uvicorn_range_is_the_pinned_one() -> None:
    pyproject = tomllib.loads(Path(__file__).parents[2].joinpath("pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("uvicorn")]
    assert pins == [f"uvicorn{TESTED_UVICORN}"]
    low, high = re.findall(r"[\d.]+", TESTED_UVICORN)
    version = tuple(int(part) for part in uvicorn.__version__.split(".")[:2])
    assert tuple(map(int, low.split("."))) <= version < tuple(map(int, high.split(".")))
