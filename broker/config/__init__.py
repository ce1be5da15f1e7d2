"""Settings, declared once: their options, parsers and validation."""
