"""The typed in-memory song every part of musicray exchanges.

Time is symbolic: an event sits at ``(bar, position)`` where ``position`` counts grid steps from the bar's
downbeat (``Metre.positions_per_beat`` steps per beat) and a duration is a number of grid steps. Expression
(velocity, tempo) is kept as performed; the vocabulary bins it when a song is encoded
(``musicray.quantize.quantized`` gives the binned song that ``decode(encode(song))`` reproduces).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from musicray.errors import SongError

TRACKS: tuple[str, ...] = ("MELODY", "BRIDGE", "PIANO")


@dataclass(frozen=True)
class Metre:
    """A time signature and the quantization grid that goes with it.

    ``beat_unit`` is the beat's length in quarter notes (1 for x/4, 1.5 for the dotted-quarter beat of x/8
    compound metres) so that MIDI ticks and tempo in quarter notes per minute can be derived.
    """

    name: str
    beats_per_bar: int
    positions_per_beat: int
    beat_unit: float

    @property
    def positions_per_bar(self) -> int:
        return self.beats_per_bar * self.positions_per_beat

    @property
    def numerator(self) -> int:
        return int(self.name.split("/")[0])

    @property
    def denominator(self) -> int:
        return int(self.name.split("/")[1])


# Simple metres use a 16th-note grid (4 per beat), compound metres 6 steps per dotted-quarter beat (8ths and
# their halves); docs/quantization.md gives the measured onset displacement on POP909 behind this choice.
METRES: dict[str, Metre] = {
    "4/4": Metre("4/4", beats_per_bar=4, positions_per_beat=4, beat_unit=1.0),
    "3/4": Metre("3/4", beats_per_bar=3, positions_per_beat=4, beat_unit=1.0),
    "2/4": Metre("2/4", beats_per_bar=2, positions_per_beat=4, beat_unit=1.0),
    "12/8": Metre("12/8", beats_per_bar=4, positions_per_beat=6, beat_unit=1.5),
    "6/8": Metre("6/8", beats_per_bar=2, positions_per_beat=6, beat_unit=1.5),
}


def metre(name: str) -> Metre:
    try:
        return METRES[name]
    except KeyError:
        raise SongError(f"metre: unknown metre {name!r}; known: {', '.join(METRES)}") from None


@dataclass(frozen=True)
class Section:
    """A phrase: its label (POP909 phrase letters: upper case melodic, lower case non-melodic) and length."""

    label: str
    bars: int


SECTION_LABELS: tuple[str, ...] = ("i", "A", "B", "C", "D", "E", "X", "b", "x", "o")
MAX_SECTION_BARS = 32
_FORM_ITEM = re.compile(r"([A-Za-z])(\d+)")
# The forms ``parse_form`` accepts, as one regular expression (the HTTP API's schema states it).
FORM_PATTERN = (r"^\s*(?:[" + "".join(SECTION_LABELS) + r"]0*(?:"
                + "|".join(str(n) for n in range(MAX_SECTION_BARS, 0, -1)) + r"))+\s*$")


def parse_form(form: str) -> list[Section]:
    """Parse a form string such as ``i4A8B8A8o4`` into sections, rejecting anything malformed."""
    if not isinstance(form, str) or not form.strip():
        raise SongError("form: empty form string")
    text = form.strip()
    sections: list[Section] = []
    consumed = 0
    for match in _FORM_ITEM.finditer(text):
        if match.start() != consumed:
            raise SongError(f"form: unexpected {text[consumed:match.start()]!r} at character {consumed} of {text!r}")
        label, bars = match.group(1), int(match.group(2))
        if label not in SECTION_LABELS:
            raise SongError(f"form: unknown section label {label!r} at character {match.start()} of {text!r}; "
                            f"known: {''.join(SECTION_LABELS)}")
        if not 1 <= bars <= MAX_SECTION_BARS:
            raise SongError(f"form: section {label}{bars} at character {match.start()} has {bars} bars; "
                            f"allowed 1..{MAX_SECTION_BARS}")
        sections.append(Section(label, bars))
        consumed = match.end()
    if consumed != len(text):
        raise SongError(f"form: unexpected {text[consumed:]!r} at character {consumed} of {text!r}")
    return sections


def form_returns(sections: list[Section]) -> list[tuple[int, int]]:
    """(bar, source bar), 0-based, for every bar of a section whose label came before: the corresponding bar of
    the label's first section (where that one is long enough). ``A8 B8 A4`` returns bars 16-19 to bars 0-3."""
    first: dict[str, tuple[int, int]] = {}
    returns, start = [], 0
    for section in sections:
        if section.label in first:
            source_start, source_bars = first[section.label]
            returns += [(start + k, source_start + k) for k in range(min(section.bars, source_bars))]
        else:
            first[section.label] = (start, section.bars)
        start += section.bars
    return returns


def form_string(sections: list[Section]) -> str:
    return "".join(f"{s.label}{s.bars}" for s in sections)


@dataclass(frozen=True, order=True)
class Note:
    bar: int
    position: int
    pitch: int
    duration: int
    velocity: int


# The array helpers import numpy where they run: the CLI's --help imports this module and loads no heavy library.
def note_rows(notes: list[Note]) -> "numpy.ndarray":
    """The notes as an int64 array of rows (bar, position, pitch, duration, velocity), for work on whole tracks."""
    import numpy as np

    return np.array([(n.bar, n.position, n.pitch, n.duration, n.velocity) for n in notes],
                    dtype=np.int64).reshape(-1, 5)


def notes_from_rows(rows: "numpy.ndarray") -> list[Note]:
    """The Notes of ``note_rows``-shaped rows. Built as unpickling builds them, fields straight into the new
    object's __dict__: a frozen dataclass's __init__ sets each field through object.__setattr__, which made
    building Notes a tenth of preparing a POP909 song (twice 2,000 Notes: ingest, then quantization)."""
    new = object.__new__
    notes = []
    for bar, position, pitch, duration, velocity in rows.tolist():
        note = new(Note)
        note.__dict__.update(bar=bar, position=position, pitch=pitch, duration=duration, velocity=velocity)
        notes.append(note)
    return notes


def one_per_onset_and_pitch_rows(rows: "numpy.ndarray") -> "numpy.ndarray":
    """Note rows (onset columns.., pitch, duration, velocity) with one row per (onset, pitch), the longest, then
    the loudest (two notes of one pitch cannot sound at once in MIDI), sorted by onset and pitch. The onset is
    any leading columns: (bar, position), or a grid step."""
    import numpy as np

    key_columns = rows.shape[1] - 2
    # Sorted by onset and pitch, then longest and loudest first, so the first row of each (onset, pitch) is kept.
    order = np.lexsort((-rows[:, -1], -rows[:, -2], *(rows[:, i] for i in reversed(range(key_columns)))))
    rows = rows[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = np.any(rows[1:, :key_columns] != rows[:-1, :key_columns], axis=1)
    return rows[first]


@dataclass(frozen=True, order=True)
class Chord:
    """A chord change on the beat grid; it sounds until the next change. ``label`` is canonical Harte."""

    bar: int
    position: int
    label: str


@dataclass(frozen=True, order=True)
class Tempo:
    """A tempo (beats per minute, beat as in the metre) from ``(bar, position)`` on."""

    bar: int
    position: int
    bpm: float


@dataclass
class Song:
    song_id: str
    key: str
    metre: str
    sections: list[Section]
    chords: list[Chord] = field(default_factory=list)
    tracks: dict[str, list[Note]] = field(default_factory=lambda: {name: [] for name in TRACKS})
    tempos: list[Tempo] = field(default_factory=list)

    @property
    def spec(self) -> Metre:
        return metre(self.metre)

    @property
    def n_bars(self) -> int:
        return sum(s.bars for s in self.sections)

    @property
    def form(self) -> str:
        return form_string(self.sections)

    def notes(self) -> list[tuple[str, Note]]:
        return [(name, note) for name in TRACKS for note in self.tracks.get(name, [])]

    def replace(self, **changes) -> "Song":
        return replace(self, **changes)

    def check(self) -> None:
        """Raise SongError naming the first field that breaks the song's invariants."""
        from musicray.harmony import parse_chord, parse_key

        parse_key(self.key)
        spec = self.spec
        if not self.sections:
            raise SongError(f"{self.song_id}: sections: a song needs at least one section")
        n_bars, positions = self.n_bars, spec.positions_per_bar

        # Each event is tested inline (a POP909 song has thousands); this names what is wrong with a failing one.
        def check_time(where: str, bar: int, position: int) -> None:
            if not (0 <= bar < n_bars and 0 <= position < positions):
                raise SongError(f"{self.song_id}: {where}: time (bar {bar}, position {position}) outside "
                                f"{n_bars} bars of {positions} positions")

        for chord in self.chords:
            if not (0 <= chord.bar < n_bars and 0 <= chord.position < positions):
                check_time(f"chord {chord.label}", chord.bar, chord.position)
            parse_chord(chord.label)
        for tempo in self.tempos:
            if not (0 <= tempo.bar < n_bars and 0 <= tempo.position < positions):
                check_time("tempo", tempo.bar, tempo.position)
            if not tempo.bpm > 0:
                raise SongError(f"{self.song_id}: tempo: non-positive bpm {tempo.bpm} at bar {tempo.bar}")
        unknown = set(self.tracks) - set(TRACKS)
        if unknown:
            raise SongError(f"{self.song_id}: tracks: unknown track(s) {sorted(unknown)}; known: {TRACKS}")
        for name, note in self.notes():
            if not (0 <= note.bar < n_bars and 0 <= note.position < positions and 0 <= note.pitch <= 127
                    and note.duration >= 1 and 1 <= note.velocity <= 127):
                check_time(f"{name} note", note.bar, note.position)
                raise SongError(f"{self.song_id}: {name} note: pitch/duration/velocity out of range in {note}")

    def inside_form(self, note: Note) -> Note:
        """The note cut to end at the form's end at the latest (the song lasts exactly its form's bars)."""
        steps = self.spec.positions_per_bar
        steps_left = (self.n_bars - note.bar) * steps - note.position
        return note if note.duration <= steps_left else replace(note, duration=steps_left)

    def section_starts(self) -> list[int]:
        """First bar of each section."""
        starts, bar = [], 0
        for section in self.sections:
            starts.append(bar)
            bar += section.bars
        return starts


def song_to_dict(song: Song) -> dict:
    """A JSON-ready dict (compact: notes, chords and tempos as lists of fields)."""
    return {
        "song_id": song.song_id, "key": song.key, "metre": song.metre, "form": song.form,
        "chords": [[c.bar, c.position, c.label] for c in song.chords],
        "tracks": {name: [[n.bar, n.position, n.pitch, n.duration, n.velocity] for n in notes]
                   for name, notes in song.tracks.items()},
        "tempos": [[t.bar, t.position, t.bpm] for t in song.tempos],
    }


def song_from_dict(data: dict) -> Song:
    try:
        return Song(
            song_id=str(data["song_id"]), key=data["key"], metre=data["metre"], sections=parse_form(data["form"]),
            chords=[Chord(int(b), int(p), str(label)) for b, p, label in data["chords"]],
            tracks={name: [Note(*map(int, n)) for n in data["tracks"].get(name, [])] for name in TRACKS},
            tempos=[Tempo(int(b), int(p), float(bpm)) for b, p, bpm in data["tempos"]],
        )
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, SongError):
            raise
        raise SongError(f"song JSON: missing or malformed field ({type(err).__name__}: {err})") from None
