"""User errors: one exception type whose message names the field at fault (CLI, jobs and HTTP all report it)."""

from __future__ import annotations


class SongError(ValueError):
    """A song, form string, request or config field that cannot be used; the message names the field."""
