"""`make bench`: the broker's throughput, latency and memory, measured end to end.

Everything runs on this machine and talks to 127.0.0.1 only: an embedded PostgreSQL in a
temporary directory, a broker process pinned to CPU 0, and on CPU 1 the load: a writer that
INSERTs rows with plain SQL (`writer.py`) and raw-socket SSE clients (`client.py`). Commit and
receive times are both `time.monotonic()` (CLOCK_MONOTONIC, one clock for every process on
Linux), so latency is receive time minus commit time. `python -m tests.bench --help` lists the
scenarios; `scenarios.py` says what each one measures.
"""
