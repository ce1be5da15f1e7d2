"""The HTTP server underneath: uvicorn's protocol, pipelining, the socket sink.

Every uvicorn internal pgsse relies on is reached from here and listed in `hooks`."""
