"""Where the embedded PostgreSQL lives, and as which user it runs."""
