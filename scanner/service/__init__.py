"""The HTTP service: score, explain and mitigate API plus the interactive prompt page."""

from .app import MAX_CHARS, MAX_PROMPTS, create_app

__all__ = ["MAX_CHARS", "MAX_PROMPTS", "create_app"]
