"""What pgsse relies on in uvicorn's internals, and the check that a uvicorn has all of it.

The protocol subclass (`transport.py`, on `pipelining.py`) overrides uvicorn's httptools
callbacks and reads its request cycles' state, none of which is public API. uvicorn is pinned
to the range tests/test_transport.py drives over real sockets (`TESTED_UVICORN`); in case a
release changes it anyway, `check_uvicorn` runs before serving and names the hook it lacks.
"""

from __future__ import annotations

import inspect

import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["TESTED_UVICORN", "UVICORN_HOOKS", "check_uvicorn"]

TESTED_UVICORN = ">=0.55,<0.56"  # as pinned in pyproject.toml

# What transport.py and pipelining.py rely on, by owner: methods they override or call,
# attributes they read.
UVICORN_HOOKS: dict[type, tuple[str, ...]] = {
    HttpToolsProtocol: (
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "on_response_complete",
        "send_400_response",
        "self.cycle",
        "self.pipeline",
        "self.flow",
        "self.headers",
        "self.scope",
        "self.parser",
        "self.loop",
        "self.transport",
    ),
    FlowControl: ("resume_reading", "self._is_writable_event"),
    RequestResponseCycle: (
        "self.disconnected",
        "self.message_event",
        "self.response_started",
        "self.response_complete",
        "self.scope",
    ),
}


def check_uvicorn() -> None:
    """Raise `RuntimeError` naming the first of `UVICORN_HOOKS` the installed uvicorn lacks."""
    for owner, hooks in UVICORN_HOOKS.items():
        source = inspect.getsource(owner)
        for hook in hooks:
            present = (
                f"{hook} =" in source or f"{hook}:" in source
                if hook.startswith("self.")
                else callable(getattr(owner, hook, None))
            )
            if not present:
                raise RuntimeError(
                    f"uvicorn {uvicorn.__version__} has no {owner.__name__}"
                    f".{hook.removeprefix('self.')}, which broker/server/protocol.py relies on"
                    f" (tested: uvicorn{TESTED_UVICORN})"
                )
