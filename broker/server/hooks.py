"""Every uvicorn internal pgsse relies on, and the check that a uvicorn has all of it.

None of what is listed here is uvicorn's public API:

- the protocol subclass (`protocol.py`, on `pipelining.py`) overrides uvicorn's httptools
  callbacks and reads its request cycles' and flow control's state;
- the sink (`sink.py`) writes HTTP chunks on the transport itself, framed as uvicorn frames a
  body with no `Content-Length` on HTTP/1.1;
- the event stream (`web/stream.py`) relies on uvicorn's `send` waiting for flow control
  before it writes, so an empty body message returns once the socket has drained;
- `runner.py` subclasses `uvicorn.Server`: it overrides `handle_exit`, reads `should_exit`
  and `started`, and ignores the signal uvicorn raises again once it has shut down;
- `log.py` drops two of uvicorn's log messages by their text.

uvicorn is pinned to the range the tests drive over real sockets (`TESTED_UVICORN`); in case a
release changes it anyway, `check_uvicorn` runs before serving (`protocol.limited_protocol`)
and names the hook it lacks and the module that relies on it.
"""

from __future__ import annotations

import inspect

import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

__all__ = ["TESTED_UVICORN", "UVICORN_HOOKS", "check_uvicorn"]

TESTED_UVICORN = ">=0.55,<0.56"  # as pinned in pyproject.toml

PROTOCOL = "broker/server/protocol.py"
PIPELINING = "broker/server/pipelining.py"
BOTH = "broker/server/protocol.py and pipelining.py"
SINK = "broker/server/sink.py"
STREAM = "broker/web/stream.py"
RUNNER = "broker/server/runner.py"
LOG = "broker/log.py"

# By owner: each hook and the module that relies on it. A hook is a method (overridden or
# called), `self.<attribute>` (assigned in the owner's source), or `code: <text>`, a line of
# the owner's source whose behaviour is relied on.
UVICORN_HOOKS: dict[type, dict[str, str]] = {
    HttpToolsProtocol: {
        "connection_made": BOTH,
        "connection_lost": BOTH,
        "data_received": BOTH,
        "on_message_begin": PROTOCOL,
        "on_url": PROTOCOL,
        "on_header": PROTOCOL,
        "on_headers_complete": BOTH,
        "on_body": BOTH,
        "on_message_complete": PROTOCOL,
        "on_response_complete": BOTH,
        "send_400_response": PROTOCOL,
        "self.cycle": BOTH,
        "self.pipeline": BOTH,
        "self.flow": PIPELINING,
        "self.headers": PROTOCOL,
        "self.scope": PROTOCOL,
        "self.parser": PROTOCOL,
        "self.loop": PROTOCOL,
        "self.transport": BOTH,
        'code: msg = "Invalid HTTP request received."': LOG,
    },
    FlowControl: {
        "resume_reading": PIPELINING,
        "self._is_writable_event": PIPELINING,
        "drain": STREAM,
        "self.write_paused": STREAM,
    },
    RequestResponseCycle: {
        "self.disconnected": PIPELINING,
        "self.message_event": PIPELINING,
        "self.response_started": PROTOCOL,
        "self.response_complete": BOTH,
        "self.scope": PIPELINING,
        "send": STREAM,
        "code: await self.flow.drain()": STREAM,
        "self.chunked_encoding": SINK,
        'code: content = [b"%x\\r\\n" % len(body), body, b"\\r\\n"]': SINK,
        'code: msg = "ASGI callable returned without completing response."': LOG,
    },
    uvicorn.Server: {
        "run": RUNNER,
        "handle_exit": RUNNER,
        "self.should_exit": RUNNER,
        "self.started": RUNNER,
        "capture_signals": RUNNER,
        "code: signal.raise_signal(captured_signal)": RUNNER,
    },
}


def check_uvicorn() -> None:
    """Raise `RuntimeError` naming the first of `UVICORN_HOOKS` the installed uvicorn lacks."""
    for owner, hooks in UVICORN_HOOKS.items():
        source = inspect.getsource(owner)
        for hook, user in hooks.items():
            if hook.startswith("code: "):
                present = hook.removeprefix("code: ") in source
            elif hook.startswith("self."):
                present = f"{hook} =" in source or f"{hook}:" in source
            else:
                present = callable(getattr(owner, hook, None))
            if not present:
                raise RuntimeError(
                    f"uvicorn {uvicorn.__version__} has no {owner.__name__}"
                    f".{hook.removeprefix('self.')}, which {user} relies on"
                    f" (tested: uvicorn{TESTED_UVICORN})"
                )
