"""pgsse: push rows of PostgreSQL table `messages` to browsers as Server-Sent Events."""

__version__ = "0.1.0"
