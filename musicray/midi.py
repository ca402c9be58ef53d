"""Song <-> Standard MIDI File, through miditoolkit.

A musicray MIDI has one instrument per track (MELODY, BRIDGE, PIANO, in that order, empty ones included), each
with its own General MIDI program (``musicray.instruments``: by default a lead synth, strings and a piano; any
mapping of track to instrument may replace them), a time signature, a key signature and tempo events, so any
sequencer plays it. The programs are the file's sound only: reading a file back gives the same Song whatever
they are (``midi_instruments`` reads them). What MIDI has no event
for travels as markers, so that ``midi_to_song(song_to_midi(song)) == song`` for songs on the grid:

* ``musicray:1`` (format) and ``song:<id>`` at tick 0,
* ``key:Gb:maj`` and ``metre:12/8`` at tick 0 (a key signature cannot tell ``Gb:min`` spelling apart and MIDI
  has no dotted-quarter beat),
* ``section:A8`` at each section's first bar,
* ``chord:Gb:maj7/5`` at each chord change,
* ``tempo:117.37`` beside each tempo event: MIDI stores whole microseconds per quarter note, which loses float
  bpm. The tempo events stay the truth (a tempo edited in a sequencer is read as edited); a marker only restores
  the exact bpm of an event it agrees with.

Tempo events are written only where the bpm changes, so a per-beat tempo list comes back collapsed to its change
points: compare against ``collapse_tempos(song.tempos)``.

Any other MIDI file (a user's melody, POP909) is read from its events: metre from the first time signature
(4/4 if missing or not in ``METRES``), key from the first key signature (``C:maj`` if missing), onsets and
durations rounded to the grid, tracks matched by instrument name (case-insensitive; other instruments are
left out, and if none matches the first melodic instrument becomes MELODY), no chords, and sections of "A"
covering all bars, cut into pieces of at most ``MAX_SECTION_BARS`` bars as longer sections cannot be represented.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import miditoolkit

from musicray.harmony import PITCH_CLASS_NAMES, canonical_chord, canonical_key, parse_key
from musicray.instruments import instrument_programs
from musicray.song import (
    MAX_SECTION_BARS, METRES, TRACKS, Chord, Metre, Note, Section, Song, SongError, Tempo, metre, parse_form,
)

FORMAT_MARKER = "musicray:1"
DEFAULT_METRE = "4/4"
DEFAULT_KEY = "C:maj"
FALLBACK_SECTION_LABEL = "A"
MIDI_HEADER = b"MThd"
# Marker text is written as UTF-8 (a song id may be any text); readers decode MIDI text as latin-1, which never
# fails on foreign files, and musicray markers are re-decoded (ASCII reads the same either way).
TEXT_CHARSET = "utf-8"
DEFAULT_QPM = 120.0  # what miditoolkit writes and assumes where a file has no tempo
# Relative error of a tempo stored in whole microseconds per quarter note (at most 0.5 us in 250000 us at 240
# qpm), with room; a tempo edited in a sequencer moves further than this and then wins over its marker.
TEMPO_ROUNDING = 1e-4

# Key signature names mido accepts, one per (tonic, mode): major keys in musicray's own spelling, minor keys in
# the spelling a key signature has (there is no Dbm or Gbm signature, only C#m and F#m).
_MAJOR_SIGNATURES = PITCH_CLASS_NAMES
_MINOR_SIGNATURES = ("Cm", "C#m", "Dm", "Ebm", "Em", "Fm", "F#m", "Gm", "G#m", "Am", "Bbm", "Bm")


# -- time ---------------------------------------------------------------------------------------------------------
def ticks_per_position(spec: Metre, ticks_per_beat: int) -> float:
    """MIDI ticks of one grid step; ``ticks_per_beat`` counts per quarter note as MIDI does."""
    return ticks_per_beat * spec.beat_unit / spec.positions_per_beat


def _grid_ticks(spec: Metre, ticks_per_beat: int) -> int:
    step = ticks_per_position(spec, ticks_per_beat)
    if step != int(step) or step < 1:
        raise SongError(f"midi: ticks_per_beat {ticks_per_beat} does not divide the {spec.name} grid "
                        f"({spec.positions_per_beat} steps per {spec.beat_unit} quarter notes)")
    return int(step)


def _tick(spec: Metre, step: int, bar: int, position: int) -> int:
    return (bar * spec.positions_per_bar + position) * step


def _grid_time(spec: Metre, step: float, tick: float) -> tuple[int, int]:
    """(bar, position) of the grid step nearest to ``tick``."""
    return divmod(round(tick / step), spec.positions_per_bar)


def collapse_tempos(tempos: list[Tempo]) -> list[Tempo]:
    """Only the tempos whose bpm differs from the one before: what survives a trip through MIDI."""
    changes: list[Tempo] = []
    for tempo in tempos:
        if not changes or tempo.bpm != changes[-1].bpm:
            changes.append(tempo)
    return changes


# -- writing ------------------------------------------------------------------------------------------------------
def key_signature_name(key: str) -> str:
    """``Eb:min`` -> ``Ebm``, ``Db:min`` -> ``C#m``: the name miditoolkit/mido write as a key signature."""
    tonic, mode = parse_key(key)
    return (_MAJOR_SIGNATURES if mode == "maj" else _MINOR_SIGNATURES)[tonic]


def song_to_midi(song: Song, ticks_per_beat: int = 480, instruments=None) -> miditoolkit.MidiFile:
    """The song as a MIDI file; ``instruments`` maps tracks to General MIDI programs or names (the others keep
    ``DEFAULT_INSTRUMENTS``)."""
    programs = instrument_programs(instruments)
    song.check()
    spec = song.spec
    step = _grid_ticks(spec, ticks_per_beat)
    midi = miditoolkit.MidiFile(ticks_per_beat=ticks_per_beat)
    midi.time_signature_changes = [miditoolkit.TimeSignature(spec.numerator, spec.denominator, 0)]
    midi.key_signature_changes = [miditoolkit.KeySignature(key_signature_name(song.key), 0)]
    markers = [miditoolkit.Marker(text, 0) for text in
               (FORMAT_MARKER, f"song:{song.song_id}", f"key:{canonical_key(song.key)}", f"metre:{spec.name}")]
    for start, section in zip(song.section_starts(), song.sections):
        markers.append(miditoolkit.Marker(f"section:{section.label}{section.bars}", _tick(spec, step, start, 0)))
    for chord in song.chords:
        markers.append(miditoolkit.Marker(f"chord:{canonical_chord(chord.label)}",
                                          _tick(spec, step, chord.bar, chord.position)))
    for tempo in collapse_tempos(song.tempos):
        tick = _tick(spec, step, tempo.bar, tempo.position)
        midi.tempo_changes.append(miditoolkit.TempoChange(tempo.bpm * spec.beat_unit, tick))
        markers.append(miditoolkit.Marker(f"tempo:{float(tempo.bpm)!r}", tick))
    # A stable sort keeps the tick-0 header markers first and sections before the chords at the same tick.
    midi.markers = sorted(markers, key=lambda marker: marker.time)
    for name in TRACKS:
        instrument = miditoolkit.Instrument(program=programs[name], is_drum=False, name=name)
        for note in song.tracks.get(name, []):
            start = _tick(spec, step, note.bar, note.position)
            instrument.notes.append(miditoolkit.Note(velocity=int(note.velocity), pitch=int(note.pitch), start=start,
                                                     end=start + int(note.duration) * step))
        midi.instruments.append(instrument)
    midi.max_tick = max([n.end for i in midi.instruments for n in i.notes] + [m.time for m in midi.markers]) + 1
    return midi


def write_midi(song: Song, path: str | Path, ticks_per_beat: int = 480, instruments=None) -> Path:
    path = Path(path)
    midi = song_to_midi(song, ticks_per_beat, instruments)
    path.parent.mkdir(parents=True, exist_ok=True)
    midi.dump(str(path), charset=TEXT_CHARSET)
    return path


def set_instruments(midi: miditoolkit.MidiFile, instruments) -> miditoolkit.MidiFile:
    """Give the instruments named after tracks (MELODY, BRIDGE, PIANO, any case) the programs of ``instruments``
    (a mapping of track to program or name, only those tracks); other instruments are left as they are."""
    given = {str(track).strip().upper() for track in instruments}
    programs = {track: program for track, program in instrument_programs(instruments).items() if track in given}
    for instrument in midi.instruments:
        track = _track_of(instrument)
        if track in programs and not instrument.is_drum:
            instrument.program = programs[track]
    return midi


# -- reading ------------------------------------------------------------------------------------------------------
def _load(source, what: str) -> miditoolkit.MidiFile:
    """Parse bytes into a MidiFile; every failure of the MIDI libraries becomes a SongError naming ``what``."""
    if not source:
        raise SongError(f"{what}: empty file (0 bytes), not a MIDI file")
    if not source.startswith(MIDI_HEADER):
        raise SongError(f"{what}: not a Standard MIDI File (no 'MThd' header; starts with {source[:8]!r})")
    try:
        return miditoolkit.MidiFile(file=io.BytesIO(source))
    except EOFError:
        raise SongError(f"{what}: truncated MIDI file ({len(source)} bytes): data ends inside a chunk") from None
    except Exception as error:  # mido and miditoolkit raise OSError, ValueError, KeyError, IndexError... on garbage
        raise SongError(f"{what}: corrupt MIDI file: {type(error).__name__}: {error}") from None


def _open(source) -> tuple[miditoolkit.MidiFile, str, str | None]:
    """(midi, name for messages, song id from the file name)."""
    if isinstance(source, miditoolkit.MidiFile):
        return source, "midi", None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _load(bytes(source), "midi upload"), "midi upload", None
    path = Path(source)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SongError(f"{path}: cannot read MIDI file: {error.strerror or error}") from None
    return _load(data, str(path)), str(path), path.stem


def _as_utf8(text: str) -> str:
    """Text a file stored as UTF-8 but the MIDI reader decoded as latin-1, decoded right; other text unchanged."""
    try:
        return text.encode("latin-1").decode(TEXT_CHARSET)
    except UnicodeError:
        return text


def _markers(midi: miditoolkit.MidiFile) -> dict[str, list[tuple[str, int]]]:
    """Musicray markers by kind: ``{"chord": [("F:maj", tick), ...], ...}``, empty for a foreign file (whose
    markers, such as "Verse: 1", mean nothing to musicray)."""
    if not any(marker.text == FORMAT_MARKER for marker in midi.markers):
        return {}
    found: dict[str, list[tuple[str, int]]] = {}
    for marker in sorted(midi.markers, key=lambda m: m.time):
        kind, sep, value = _as_utf8(marker.text).partition(":")
        if sep:
            found.setdefault(kind, []).append((value, marker.time))
    return found


def _read_metre(midi: miditoolkit.MidiFile, markers: dict) -> Metre:
    if "metre" in markers:
        return metre(markers["metre"][0][0])
    for signature in sorted(midi.time_signature_changes, key=lambda ts: ts.time)[:1]:
        name = f"{signature.numerator}/{signature.denominator}"
        if name in METRES:
            return METRES[name]
    return METRES[DEFAULT_METRE]


def _read_key(midi: miditoolkit.MidiFile, markers: dict) -> str:
    if "key" in markers:
        return canonical_key(markers["key"][0][0])
    for signature in sorted(midi.key_signature_changes, key=lambda ks: ks.time)[:1]:
        tonic, minor = signature.key_number % 12, signature.key_number >= 12
        return f"{PITCH_CLASS_NAMES[tonic]}:{'min' if minor else 'maj'}"
    return DEFAULT_KEY


def _track_of(instrument: miditoolkit.Instrument) -> str | None:
    name = (instrument.name or "").strip().upper()
    return name if name in TRACKS else None


def _read_tracks(midi: miditoolkit.MidiFile, spec: Metre, step: float) -> dict[str, list[Note]]:
    named = [(_track_of(inst), inst) for inst in midi.instruments]
    if not any(track for track, _ in named):
        # A foreign file: its first melodic instrument is taken as the melody, the rest left out.
        melodic = [inst for inst in midi.instruments if not inst.is_drum and inst.notes]
        named = [("MELODY", melodic[0])] if melodic else []
    tracks: dict[str, list[Note]] = {name: [] for name in TRACKS}
    for track, instrument in named:
        if track is None:
            continue
        for note in instrument.notes:
            if note.velocity <= 0:
                continue
            onset = round(note.start / step)
            duration = max(1, round(note.end / step) - onset)
            bar, position = divmod(onset, spec.positions_per_bar)
            tracks[track].append(Note(bar, position, min(127, max(0, note.pitch)), duration,
                                      min(127, note.velocity)))
    return {name: sorted(notes) for name, notes in tracks.items()}


def _fallback_sections(tracks: dict[str, list[Note]], spec: Metre) -> list[Section]:
    """Sections labelled A covering every bar that sounds, at most MAX_SECTION_BARS bars each."""
    end = max((n.bar * spec.positions_per_bar + n.position + n.duration for ns in tracks.values() for n in ns),
              default=0)
    bars = max(1, math.ceil(end / spec.positions_per_bar))
    full, rest = divmod(bars, MAX_SECTION_BARS)
    lengths = [MAX_SECTION_BARS] * full + ([rest] if rest else [])
    return [Section(FALLBACK_SECTION_LABEL, length) for length in lengths]


def _exact_bpm(qpm: float, tick: int, spec: Metre, marked: dict[int, float], musicray_file: bool) -> float | None:
    """The bpm of a tempo event: the marker's exact value where one agrees with the event (MIDI rounds tempo to
    whole microseconds), the event's own where it was edited, None for the writer's filler tempo."""
    bpm = qpm / spec.beat_unit
    if tick in marked and math.isclose(marked[tick], bpm, rel_tol=TEMPO_ROUNDING):
        return marked[tick]
    if musicray_file and tick == 0 and qpm == DEFAULT_QPM:
        return None  # miditoolkit writes 120 qpm at tick 0 when the song has no tempo there
    return bpm


def _read_tempos(midi: miditoolkit.MidiFile, markers: dict, spec: Metre, step: float) -> list[Tempo]:
    marked = {tick: float(value) for value, tick in markers.get("tempo", [])}
    by_time: dict[tuple[int, int], float] = {}
    for change in sorted(midi.tempo_changes, key=lambda t: t.time):
        bpm = _exact_bpm(change.tempo, change.time, spec, marked, bool(markers))
        if bpm is not None:
            by_time[_grid_time(spec, step, change.time)] = bpm  # the last of events rounded onto one step wins
    return collapse_tempos([Tempo(bar, position, bpm) for (bar, position), bpm in sorted(by_time.items())])


def _song_from_midi(midi: miditoolkit.MidiFile, song_id: str) -> Song:
    markers = _markers(midi)
    spec = _read_metre(midi, markers)
    step = ticks_per_position(spec, midi.ticks_per_beat)
    tracks = _read_tracks(midi, spec, step)
    if "section" in markers:
        sections = parse_form("".join(value for value, _ in markers["section"]))
    else:
        sections = _fallback_sections(tracks, spec)
    chords = [Chord(*_grid_time(spec, step, tick), canonical_chord(label))
              for label, tick in markers.get("chord", [])]
    song = Song(song_id=song_id, key=_read_key(midi, markers), metre=spec.name, sections=sections,
                chords=sorted(chords), tracks=tracks, tempos=_read_tempos(midi, markers, spec, step))
    song.check()
    return song


def midi_to_song(midi_or_path, song_id: str | None = None) -> Song:
    """Read a Song from a MidiFile, a path or the bytes of a file; raise SongError if it cannot be read.

    The song id is ``song_id`` if given, else the ``song:`` marker of a musicray file, else the file's stem.
    """
    midi, what, stem = _open(midi_or_path)
    try:
        markers = _markers(midi)
        name = song_id or (markers["song"][0][0] if "song" in markers else None) or stem or "midi"
        return _song_from_midi(midi, name)
    except SongError as error:
        raise SongError(f"{what}: {error}") from None
    except (ValueError, KeyError, IndexError, TypeError, ZeroDivisionError, OverflowError) as error:
        raise SongError(f"{what}: cannot read the song: {type(error).__name__}: {error}") from None


def read_midi(path: str | Path, song_id: str | None = None) -> Song:
    return midi_to_song(Path(path), song_id)


def midi_instruments(source) -> dict[str, int]:
    """The General MIDI program of each track a file names (MELODY, BRIDGE, PIANO), from the first program change
    in the track; tracks without notes count too (a MidiFile object has dropped those, so pass a path or bytes)."""
    import mido

    data = source if isinstance(source, (bytes, bytearray)) else None
    what = "midi upload" if data is not None else str(source)
    if data is None:
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            raise SongError(f"{what}: cannot read MIDI file: {error.strerror or error}") from None
    _load(bytes(data), what)  # a clear error for a file that is not MIDI
    programs: dict[str, int] = {}
    for track in mido.MidiFile(file=io.BytesIO(bytes(data))).tracks:
        name = (track.name or "").strip().upper()
        changes = [message.program for message in track if message.type == "program_change"]
        if name in TRACKS and name not in programs:
            programs[name] = changes[0] if changes else 0
    return programs
