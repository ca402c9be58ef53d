"""User errors: exception types whose message names the field at fault (CLI, jobs and HTTP all report them).

Every type is a ``SongError``, so whoever reports user errors (the CLI's one line and exit status 2, the HTTP
API's 4xx) reports these too.
"""

from __future__ import annotations


class SongError(ValueError):
    """A song, form string, request or config field that cannot be used; the message names the field."""


class MissingRunPart(SongError, FileNotFoundError):
    """A run directory lacks a part a command needs (no stage-1 model, no adapters, ...); the message names the
    part, where it was looked for and the command that makes it."""


class StageConflict(SongError):
    """A stage's output is already in the run directory, made with another configuration (or unfinished): the
    message says what differs and how to proceed (``--resume``, ``--force`` or another ``--out``)."""
