"""The harmony guard: what a composed stage may write to stay in the key and in register, as grammar plan tables.

POP909 measures (``python -m musicray.data.guard_tables`` writes ``harmony_guard.json`` beside this file): per key
mode, the chords that cover 99 % of the chord time, and per melodic track the register that holds 99 % of its
notes. At generation, a stage's plan gets

- chord stage: the Chord tokens of those chords in the requested key's mode (no-chord stays allowed);
- melody and secondary stages: at every onset, the Pitch token values whose pitch is in the key's scale or the
  chord sounding there (given by the prompt's chords), inside the track's register.

The grammar applies these tables in its mask (``musicray.grammar.Plan``'s ``guard_*`` fields), never in
validation: 1.5 % of POP909's melody notes lie outside the scale and the chord, and the grammar that validates
real data accepts them. Where a guard would leave a step no token, the step is unguarded (``Grammar.mask``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

from musicray.encoding import SoundingChords
from musicray.grammar import Plan
from musicray.harmony import (CHORD_QUALITIES, DEGREE_NAMES, chord_pitch_classes, key_tonic, parse_chord, parse_key,
                              reference_pitch_class, scale_pitch_classes)
from musicray.quantize import canonical_chords
from musicray.song import Song, SongError
from musicray.streams import STREAMS
from musicray.tokens import Vocabulary

GUARD_TABLES_PATH = Path(__file__).with_name("harmony_guard.json")
# The tracks whose pitches the guard keeps in the key and in register (PIANO is the chords voiced: it follows them).
GUARDED_TRACKS: tuple[str, ...] = ("MELODY", "BRIDGE")


@dataclass(frozen=True)
class GuardTables:
    """The measured tables: per key mode the allowed chords (degree names as the degree language writes them,
    e.g. ``IV:maj``), per guarded track its register (lowest, highest MIDI pitch)."""

    chords: dict[str, tuple[str, ...]]
    registers: dict[str, tuple[int, int]]

    @classmethod
    def from_json(cls, data: dict) -> "GuardTables":
        return cls({mode: tuple(chords) for mode, chords in data["chords"].items()},
                   {track: (int(low), int(high)) for track, (low, high) in data["registers"].items()})


@functools.lru_cache(maxsize=4)
def load_tables(path: Path = GUARD_TABLES_PATH) -> GuardTables:
    return GuardTables.from_json(json.loads(Path(path).read_text()))


def chord_ids(key: str, vocab: Vocabulary, tables: GuardTables) -> tuple[int, ...]:
    """The Chord token ids of the chords ``tables`` allow in ``key``'s mode, in the vocabulary's language."""
    tonic, mode = parse_key(key)
    ids = []
    for name in tables.chords[mode]:
        degree, quality = name.split(":", 1)   # the tables count from the tonic
        ids.append(vocab.chord_token((tonic + DEGREE_NAMES.index(degree)) % 12, quality, key))
    return tuple(sorted(ids))


def pitch_values(key: str, chord: str, register: tuple[int, int], vocab: Vocabulary) -> tuple[int, ...]:
    """The Pitch token values that write a pitch inside ``register`` in ``key``'s scale or ``chord``'s tones, at an
    onset where ``chord`` sounds (the relative language counts from its root)."""
    tones = set(scale_pitch_classes(key)) | set(chord_pitch_classes(chord))
    reference = reference_pitch_class(chord, key) if vocab.config.pitch == "chord" else 0
    low, high = register
    n_values = len(vocab.ids_of["Pitch"])
    return tuple(v for v in range(n_values) if low <= reference + v <= high and (reference + v) % 12 in tones)


def pitch_tables(song: Song, track: str, vocab: Vocabulary, tables: GuardTables
                 ) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, int, int], ...]]:
    """(sets, changes) for a melodic stage of ``song``: the distinct allowed-value sets, and at each chord change of
    the song's chords (as its prompt writes them) the set that holds from there on (bar from 1, position, set)."""
    key_tonic(song.key)   # a bad key raises here, naming the field
    sets: dict[tuple[int, ...], int] = {}
    changes = []
    for chord in canonical_chords(song.chords):
        values = pitch_values(song.key, chord.label, tables.registers[track], vocab)
        index = sets.setdefault(values, len(sets))
        changes.append((chord.bar + 1, chord.position, index))
    return tuple(sets), tuple(changes)


def guard_plan(plan: Plan, stream: str, song: Song, vocab: Vocabulary, tables: GuardTables | None = None) -> Plan:
    """``plan`` with the harmony guard of a ``stream`` stage of ``song`` (streams it does not guard: as it is)."""
    tables = tables or load_tables()
    tracks = STREAMS[stream].tracks
    if stream == "chord":
        return dataclasses.replace(plan, guard_chords=chord_ids(song.key, vocab, tables))
    if len(tracks) == 1 and tracks[0] in GUARDED_TRACKS and not STREAMS[stream].chords:
        sets, changes = pitch_tables(song, tracks[0], vocab, tables)
        return dataclasses.replace(plan, guard_pitch_sets=sets, guard_pitch_changes=changes)
    return plan


def check_tables(tables: GuardTables) -> None:
    """SongError naming the entry of a table that musicray cannot read."""
    for mode, chords in tables.chords.items():
        for name in chords:
            degree, _, quality = name.partition(":")
            if degree not in DEGREE_NAMES or quality not in CHORD_QUALITIES:
                raise SongError(f"harmony guard: chords.{mode}: {name!r} is not DEGREE:QUALITY")
    for track in GUARDED_TRACKS:
        low, high = tables.registers.get(track, (1, 0))
        if not 0 <= low <= high <= 127:
            raise SongError(f"harmony guard: registers.{track}: {low}..{high} is not a MIDI pitch range")


def outside_guard(song: Song, tables: GuardTables | None = None) -> list[str]:
    """What in ``song`` the guard would not have written: chords outside its mode's table, and MELODY and BRIDGE
    notes outside their register or outside both the key's scale and the chord sounding at their onset."""
    tables = tables or load_tables()
    tonic, mode = parse_key(song.key)
    scale = set(scale_pitch_classes(song.key))
    found = []
    for chord in song.chords:
        root, quality, _ = parse_chord(chord.label)
        if root is not None and f"{DEGREE_NAMES[(root - tonic) % 12]}:{quality}" not in tables.chords[mode]:
            found.append(f"chord {chord.label} at bar {chord.bar + 1} is not among the {mode} chords")
    sounding = SoundingChords(canonical_chords(song.chords))
    for track in GUARDED_TRACKS:
        low, high = tables.registers[track]
        for note in song.tracks.get(track, []):
            chord = sounding.at(note.bar, note.position) or "N"
            if not low <= note.pitch <= high:
                found.append(f"{track} pitch {note.pitch} at bar {note.bar + 1} is outside {low}..{high}")
            elif note.pitch % 12 not in scale | set(chord_pitch_classes(chord)):
                found.append(f"{track} pitch {note.pitch} at bar {note.bar + 1} is in neither {song.key} nor {chord}")
    return found
