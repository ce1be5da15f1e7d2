"""`make soak`: an operator's bad week in a few minutes, bounded, seeded and repeatable.

Two real broker processes behind real nginx `least_conn` (the `deploy/nginx` files), one
embedded PostgreSQL, ~300 raw-socket SSE clients on 30 sessions plus 5 global ones, a writer
at ~100 rows/s (some rows of 20-100 kB, some 10-row INSERTs), clients dropping (FIN or RST) and
resuming with their last id through nginx, and every minute a fault in turn: the listeners
terminated, PostgreSQL stopped for 3 s, one broker killed with SIGKILL and restarted on its
port, a client that stops reading for 20 s. It ends with an exact account per client, the
brokers' memory, descriptors, stats and listeners against where they started, the measured
listener return after each PostgreSQL return, and one summary line.

    python -m tests.soak --seconds 360 --seed 1

Not part of `make test`: it runs for minutes. Every random choice comes from `--seed`.
"""
