"""HTTP: the app, its routes and their checks, answers, tokens, stats and /metrics."""
