"""The prepared-data folder: one owner for its layout. ``musicray data prepare`` writes it (``musicray.data.prepare``),
training and the evaluation read it; all ask a ``DataDir`` for its paths.

Layout of ``DATA/``::

    songs.parquet        one row per kept song: id, split, key, metre, form, counts, the song as JSON
    song.parquet         whole-song sequences (stage 1, full fine-tune)
    chord.parquet ...    one table per sub-task (chord, melody, secondary, dynamics, tempo)
    vocabulary.json      the vocabulary the ids refer to
    report.json          what preparing kept and skipped (``musicray.data.prepare.write_tables``)

Only the standard library is imported here (the CLI and the Ray workers may use it cheaply).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SONGS_TABLE = "songs"


@dataclass(frozen=True)
class DataDir:
    """The paths of a prepared-data folder (nothing is created or checked until asked)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).expanduser())

    def __str__(self) -> str:
        return str(self.root)

    def table(self, name: str) -> Path:
        """The Parquet table ``name``: ``songs`` or a task (``musicray.tokens.TASKS``)."""
        return self.root / f"{name}.parquet"

    @property
    def songs(self) -> Path:
        return self.table(SONGS_TABLE)

    @property
    def vocabulary(self) -> Path:
        return self.root / "vocabulary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    def is_prepared(self) -> bool:
        """Whether a preparation wrote its songs table here (the mark of a prepared-data folder)."""
        return self.songs.exists()
