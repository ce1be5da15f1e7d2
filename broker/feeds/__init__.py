"""Rows from PostgreSQL to the hub or the bus: LISTEN, backfill, the relay, the bus."""
