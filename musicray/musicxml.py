"""Song -> MusicXML through music21, for score editors (MuseScore, Sibelius, Finale, Dorico).

Two layouts of one song:

* the lead sheet: the MELODY staff with the chord symbols above it,
* the full score: three staves, MELODY (with the chord symbols), BRIDGE and PIANO.

Both carry the key and time signatures, a rehearsal mark with the section's label at each section's first bar
and a metronome mark at each tempo change. A musicray MIDI file carries everything needed (its markers hold the
exact key, chords and sections: ``musicray.midi``), and so does a song JSON (``song_to_dict``, what the HTTP API
returns), so either can be exported.

Notes are placed by offset in quarter notes and music21 makes the notation when it writes the file: measures,
ties across barlines, and voices where notes of one staff overlap. Pitches are spelt with flats in flat keys and
sharps in sharp keys, as a reader expects. music21 is imported here only, so the rest of musicray does not load it.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

from musicray.harmony import BASS_DEGREES, parse_chord, parse_key
from musicray.song import TRACKS, Song, SongError, Tempo, song_from_dict

# Harte quality -> MusicXML chord kind (music21's name for it) and the degrees added to that kind. MusicXML has
# no kind for a suspended fourth with a minor seventh: it is a suspended fourth with an added flat seventh.
CHORD_KINDS: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {
    "maj": ("major", ()),
    "min": ("minor", ()),
    "dim": ("diminished", ()),
    "aug": ("augmented", ()),
    "sus2": ("suspended-second", ()),
    "sus4": ("suspended-fourth", ()),
    "7": ("dominant-seventh", ()),
    "maj7": ("major-seventh", ()),
    "min7": ("minor-seventh", ()),
    "minmaj7": ("minor-major-seventh", ()),
    "hdim7": ("half-diminished-seventh", ()),
    "dim7": ("diminished-seventh", ()),
    "maj6": ("major-sixth", ()),
    "min6": ("minor-sixth", ()),
    "sus4(b7)": ("suspended-fourth", ((7, -1),)),  # (degree, alteration in semitones)
}

LEAD_SHEET_TRACKS: tuple[str, ...] = ("MELODY",)
# A tempo change smaller than this (relative) gets no metronome mark: a player would not notice it.
TEMPO_MARK_TOLERANCE = 0.03
# music21 spells a flat with "-" (E- is E flat).
_FLAT = "-"


def _key_names(key: str) -> tuple[str, str]:
    """(music21 tonic name, mode) in the spelling of the key signature ``musicray.midi`` writes."""
    from musicray.midi import key_signature_name

    name = key_signature_name(key)
    _, mode = parse_key(key)
    tonic = name[:-1] if mode == "min" else name
    return tonic.replace("b", _FLAT), ("minor" if mode == "min" else "major")


def _speller(key_signature):
    """A function MIDI pitch -> music21 Pitch, with flats in a key of flats and sharps otherwise."""
    from music21 import pitch

    flats = key_signature.sharps < 0

    def spell(midi_pitch: int) -> "pitch.Pitch":
        spelt = pitch.Pitch(midi=midi_pitch)
        alter = spelt.accidental.alter if spelt.accidental else 0
        if (flats and alter > 0) or (not flats and alter < 0):
            spelt = spelt.getEnharmonic()
        return spelt

    return spell


def chord_symbol(label: str, spell) -> "music21.harmony.Harmony":
    """A Harte label as a music21 chord symbol (``N`` as a no-chord mark)."""
    from music21 import harmony

    root, quality, bass = parse_chord(label)
    if root is None:
        return harmony.NoChord()
    kind, added = CHORD_KINDS[quality]
    symbol = harmony.ChordSymbol(
        root=spell(60 + root).name, kind=kind,
        bass=spell(60 + (root + BASS_DEGREES[bass]) % 12).name if bass else None)
    for degree, alteration in added:
        symbol.addChordStepModification(harmony.ChordStepModification("add", degree, alteration))
    return symbol


def tempo_marks(tempos: list[Tempo]) -> list[Tempo]:
    """The tempos worth a metronome mark: the first, then each that differs from the last mark by more than
    TEMPO_MARK_TOLERANCE. A performed song (POP909 has a tempo per beat) would otherwise get a mark on every beat."""
    marks: list[Tempo] = []
    for change in tempos:
        if not marks or abs(change.bpm / marks[-1].bpm - 1) > TEMPO_MARK_TOLERANCE:
            marks.append(change)
    return marks


def song_to_score(song: Song, lead_sheet: bool = False) -> "music21.stream.Score":
    """The song as a music21 Score: the lead sheet (MELODY and chord symbols) or the full score (three staves)."""
    from music21 import clef, duration, expressions, key, metadata, meter, note, stream, tempo

    song.check()
    spec = song.spec
    step = Fraction(spec.beat_unit).limit_denominator(8) / spec.positions_per_beat  # quarter notes per grid step
    bar_length = step * spec.positions_per_bar
    song_end = bar_length * song.n_bars

    def offset(bar: int, position: int) -> Fraction:
        return bar * bar_length + position * step

    score = stream.Score()
    # A composer is named, else music21 signs the score "Music21".
    score.metadata = metadata.Metadata(title=song.song_id, composer="musicray")
    tonic, mode = _key_names(song.key)
    spell = _speller(key.Key(tonic, mode))
    for index, name in enumerate(LEAD_SHEET_TRACKS if lead_sheet else TRACKS):
        part = stream.Part(id=name)
        part.partName = name
        part.insert(0, meter.TimeSignature(spec.name))
        part.insert(0, key.Key(tonic, mode))
        notes = song.tracks.get(name, [])
        for source in notes:
            written = note.Note(spell(source.pitch), quarterLength=source.duration * step)
            written.volume.velocity = source.velocity
            part.insert(offset(source.bar, source.position), written)
        # A rest to the song's end, so every staff has all of its bars (an empty track is a staff of rests).
        last = max((offset(n.bar, n.position) + n.duration * step for n in notes), default=Fraction(0))
        if last < song_end:
            part.insert(last, note.Rest(quarterLength=song_end - last))
        part.insert(0, clef.bestClef(part, recurse=True) if notes else clef.TrebleClef())
        if index == 0:  # the song-wide marks go above the top staff, as on a lead sheet
            for chord in song.chords:
                part.insert(offset(chord.bar, chord.position), chord_symbol(chord.label, spell))
            for start, section in zip(song.section_starts(), song.sections):
                part.insert(offset(start, 0), expressions.RehearsalMark(section.label))
            for change in tempo_marks(song.tempos):
                part.insert(offset(change.bar, change.position),
                            tempo.MetronomeMark(number=round(change.bpm, 2),
                                                referent=duration.Duration(spec.beat_unit)))
        score.insert(0, part)
    return score


def write_musicxml(song: Song, path: str | Path, lead_sheet: bool = False) -> Path:
    """Write the song's lead sheet or full score as an uncompressed MusicXML file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    score = song_to_score(song, lead_sheet)
    written = Path(score.write("musicxml", fp=str(path)))
    if written != path:  # music21 names the file after ``fp`` but may add its own suffix; keep the asked name
        written.replace(path)
    return path


def read_song(path: str | Path) -> Song:
    """The song of a musicray MIDI file or a song JSON (``song_to_dict``, or an HTTP answer holding one in
    ``song``); SongError for anything else."""
    from musicray.midi import read_midi

    path = Path(path)
    if path.suffix.lower() != ".json":
        return read_midi(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise SongError(f"{path}: cannot read the song JSON: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SongError(f"{path}: not a JSON file: {error}") from None
    if isinstance(data, dict) and isinstance(data.get("song"), dict):
        data = data["song"]
    if not isinstance(data, dict):
        raise SongError(f"{path}: song JSON: expected an object with song_id, key, metre, form, chords, tracks, "
                        "tempos")
    try:
        song = song_from_dict(data)
        song.check()
    except SongError as error:
        raise SongError(f"{path}: {error}") from None
    return song

