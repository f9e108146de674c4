"""The HTTP service: score and explain API plus the interactive prompt page."""

from .app import MAX_CHARS, MAX_PROMPTS, create_app

__all__ = ["MAX_CHARS", "MAX_PROMPTS", "create_app"]
