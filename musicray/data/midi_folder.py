"""Any folder of MIDI files as training data: what POP909's annotations give, estimated from the notes.

``MidiFolderSource`` is a source for ``musicray.data.prepare`` (like POP909's and the synthetic one), so the
prepared tables have the same layout and ``train`` works on them. For each ``.mid``/``.midi`` file, recursively:

* **bars** from the file's time-signature map (ticks count quarter notes whatever the tempo, so the tempo map only
  gives the tempo events); the song's metre is the signature covering most of it, bars of another length keep the
  notes that fit. A signature musicray has no metre for is regrouped into one with its beat (``regrouped_metre``),
  and then, as in a file without any signature, the bar lines are not the file's: the downbeat is the beat of the
  bar on which the notes starting there sound longest (``downbeat_phase``). MIDI files of performances (POP909's
  among them) often put the beats off the tick grid by a constant phase: the phase is estimated from the onsets
  (their histogram folded on the beat) and the notes moved onto the grid by it (``grid_shift``).
* **quantization** to musicray's grid (``musicray.song.METRES``), one note per onset and pitch per track.
* **key** by music21's key finding (Aarden-Essen profiles) on the duration-weighted pitch classes.
* **chords** per beat by chorder's ``Dechorder.dechord`` on the pitched instruments, mapped to Harte labels
  (``CHORDER_QUALITIES``: its dominant, major and minor sevenths as triads), kept where they change.
* **track roles**: MELODY is the most prominent monophonic line (``melody_score``: loud, through the song, never
  two notes at once), BRIDGE the next monophonic line that plays in enough of the song, PIANO all the rest; where
  no instrument is monophonic, MELODY is the top line (skyline) of the highest instrument. A roles file overrides
  this per song.
* **sections** from repetition: after the bars before the first and after the last melody note (``i``, ``o``),
  the song is cut into 8-bar phrases, and phrases whose melody matches bar by bar (``PHRASE_SIMILARITY``) share a
  label (A, B, C, D, E, then X); a phrase without melody is ``x``.

Drum tracks are skipped and counted; a file that cannot be read or holds no pitched notes is skipped with its
reason (``SKIP_REASONS``), never a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from musicray.harmony import CANONICAL_BASS_DEGREES, NO_CHORD, PITCH_CLASS_NAMES, chord_label
from musicray.song import (
    MAX_SECTION_BARS, METRES, TRACKS, Chord, Metre, Note, Section, Song, SongError, Tempo, notes_from_rows,
    one_per_onset_and_pitch_rows,
)

MIDI_SUFFIXES: tuple[str, ...] = (".mid", ".midi")

SKIP_REASONS: dict[str, str] = {
    "unreadable_midi": "the file cannot be parsed as a Standard MIDI File",
    "no_notes": "the file holds no pitched notes (empty, or drums only)",
    "unsupported_metre": "the time signature covering most of the song has no musicray metre nor its beat",
    "bad_roles": "the roles file names an instrument the file does not have",
    "too_long": "notes run past MAX_BEATS beats (a damaged file, or not a song)",
}

# chorder's qualities -> Harte (musicray.harmony.CHORD_QUALITIES). chorder 0.1.4 turns a major or minor triad
# into a seventh chord wherever the seventh's pitch class sounds at all in the beat (a passing melody note will
# do): on 20 POP909 songs, root+quality agreement with chord_midi.txt was 53% with its sevenths and 74% with them
# read as their triads, so they are read as triads (docs/own_music.md).
CHORDER_QUALITIES: dict[str, str] = {
    "M": "maj", "m": "min", "o": "dim", "+": "aug", "7": "maj", "M7": "maj", "m7": "min", "o7": "dim7",
    "/o7": "hdim7", "sus2": "sus2", "sus4": "sus4",
}

# A track is monophonic when at most this share of its notes starts while another of its notes still sounds
# (legato overlaps of a few ticks are not counted: see OVERLAP_TOLERANCE_BEATS).
MONOPHONIC_OVERLAP = 0.1
OVERLAP_TOLERANCE_BEATS = 0.125
OVERLAP_PENALTY = 5.0  # melody_score's cost of overlapping notes: 10% of them cost as much as a velocity of 32
# BRIDGE must play in at least this share of the bars the melody plays in (a few fills are part of PIANO).
BRIDGE_MIN_COVERAGE = 0.25
PHRASE_BARS = 8
# Two phrases share a label when their bars' melodies (onset, pitch) overlap this much on average (Jaccard).
PHRASE_SIMILARITY = 0.6
MELODIC_LABELS: tuple[str, ...] = ("A", "B", "C", "D", "E")
OTHER_MELODIC_LABEL, NON_MELODIC_LABEL, INTRO_LABEL, OUTRO_LABEL = "X", "x", "i", "o"
# chorder reads the song in windows of this many quarter notes (an even number: it pairs beats into half bars).
CHORD_WINDOW_QUARTERS = 32
# Longer files are skipped: 20,000 beats is almost three hours at 120 bpm (POP909's longest song has 960).
MAX_BEATS = 20_000
# Steps per beat at which the beat phase of the onsets is estimated.
PHASE_BINS = 48
# An onset this close to a beat (a share of the beat) starts on it, for the downbeat estimate.
ON_BEAT_TOLERANCE = 0.125


class MidiIngestError(SongError):
    """A file that cannot be prepared; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, song_id: str, reason: str, detail: str):
        self.song_id, self.reason, self.detail = song_id, reason, detail
        super().__init__(f"{song_id}: {detail}")

    def __reduce__(self):
        return type(self), (self.song_id, self.reason, self.detail)


def midi_files(root: Path) -> dict[str, Path]:
    """Song id (the file's path under ``root``, ``pop/song.mid``) -> file, for every MIDI file under ``root``."""
    return {path.relative_to(root).as_posix(): path
            for path in sorted(root.rglob("*")) if path.suffix.lower() in MIDI_SUFFIXES and path.is_file()}


def read_roles(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """A roles file: JSON ``{"song id": {"MELODY": "Flute", "BRIDGE": 2, "PIANO": ["Piano", 3]}}``; an instrument is
    named by its track name or its index in the file (drums included). Instruments not named are PIANO."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise SongError(f"--roles: cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SongError(f"--roles: {path} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise SongError(f"--roles: {path}: expected an object of song id -> {{track: instrument}}")
    roles: dict[str, dict[str, list[str]]] = {}
    for song_id, tracks in data.items():
        if not isinstance(tracks, dict) or set(tracks) - set(TRACKS):
            raise SongError(f"--roles: {path}: song {song_id!r}: expected an object with keys among {TRACKS}")
        roles[song_id] = {track: [str(item) for item in (value if isinstance(value, list) else [value])]
                          for track, value in tracks.items()}
    return roles


@dataclass(frozen=True)
class MidiFolderSource:
    root: str
    roles: dict[str, dict[str, list[str]]] = field(default_factory=dict, compare=False)

    def ids(self) -> list[str]:
        return list(midi_files(Path(self.root)))

    def split_key(self, song_id: str) -> str:
        """The file's name without folders and suffix: a song's copies in several folders (``live/take.mid``,
        ``take.mid``) share a split, and POP909's ``001/001.mid`` falls in the split of the annotated song ``001``,
        so that runs trained on either are tested on the same songs, neither having trained on them."""
        return PurePosixPath(song_id).stem

    def for_workers(self) -> "MidiFolderSource":
        return self

    def load(self, song_id: str) -> tuple[Song, dict]:
        try:
            data = (Path(self.root) / song_id).read_bytes()
        except OSError as error:
            raise MidiIngestError(song_id, "unreadable_midi", f"cannot read the file: {error.strerror or error}") \
                from None
        return load_midi_song(data, song_id, self.roles.get(song_id))


# -- reading the file ----------------------------------------------------------------------------------------------
@dataclass
class Instrument:
    """One track of the file (a track and channel, as symusic splits it) as note arrays in ticks."""

    name: str
    is_drum: bool
    starts: np.ndarray
    ends: np.ndarray
    pitches: np.ndarray
    velocities: np.ndarray


@dataclass(frozen=True)
class TimeSignature:
    time: int
    numerator: int
    denominator: int


@dataclass(frozen=True)
class TempoChange:
    time: int
    tempo: float  # quarter notes per minute


@dataclass
class ParsedMidi:
    """What the estimates read of a MIDI file: its time division, tracks, time signatures and tempo map."""

    ticks_per_beat: int
    instruments: list[Instrument]
    time_signature_changes: list[TimeSignature]
    tempo_changes: list[TempoChange]


def _parse(data: bytes, song_id: str) -> ParsedMidi:
    """The file read with symusic (C++; a tenth of miditoolkit's time, which was half of this path's), its notes
    as arrays."""
    import symusic

    if not data.startswith(b"MThd"):
        raise MidiIngestError(song_id, "unreadable_midi", "not a Standard MIDI File (no 'MThd' header)"
                              if data else "empty file (0 bytes)")
    # A well-formed header (length 6) ends with the time division: the high bit set means SMPTE frames, not ticks
    # per quarter note.
    if data[4:8] == (6).to_bytes(4, "big") and len(data) >= 14 and data[12] & 0x80:
        raise MidiIngestError(song_id, "unreadable_midi", f"time division {int.from_bytes(data[12:14], 'big')!r} "
                              "is not in ticks per quarter note (SMPTE time is not supported)")
    try:
        score = symusic.Score.from_midi(data)
    except Exception as error:  # symusic raises RuntimeError (and others) on damaged files
        raise MidiIngestError(song_id, "unreadable_midi", f"corrupt MIDI file: {type(error).__name__}: {error}") \
            from None
    if score.ticks_per_quarter <= 0:
        raise MidiIngestError(song_id, "unreadable_midi", f"time division {score.ticks_per_quarter!r} is not in "
                              "ticks per quarter note")
    instruments = []
    for track in score.tracks:
        notes = track.notes.numpy()
        starts = notes["time"].astype(np.int64)
        instruments.append(Instrument(track.name, bool(track.is_drum), starts,
                                      starts + notes["duration"].astype(np.int64), notes["pitch"].astype(np.int64),
                                      notes["velocity"].astype(np.int64)))
    return ParsedMidi(int(score.ticks_per_quarter), instruments,
                      [TimeSignature(int(t.time), int(t.numerator), int(t.denominator)) for t in score.time_signatures],
                      [TempoChange(int(t.time), float(t.qpm)) for t in score.tempos])


@dataclass
class Bars:
    """The bar grid of the time-signature map: first tick and length (ticks) of every bar, in the song's metre."""

    spec: Metre
    starts: np.ndarray
    lengths: np.ndarray
    step: float  # ticks per grid step
    signature: str  # the time signature covering most of the file (the metre's name, unless it was regrouped)

    def place(self, ticks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bar, position, fits) of each tick; ``fits`` is False where the position lies past the song metre's bar
        (a bar of another time signature)."""
        bars = np.clip(np.searchsorted(self.starts, ticks, side="right") - 1, 0, len(self.starts) - 1)
        positions = np.rint((ticks - self.starts[bars]) / self.step).astype(np.int64)
        bar_steps = np.rint(self.lengths[bars] / self.step).astype(np.int64)
        # A note rounded onto its bar's end belongs to the next bar's downbeat.
        carry = (positions == bar_steps) & (bars + 1 < len(self.starts))
        bars, positions = np.where(carry, bars + 1, bars), np.where(carry, 0, positions)
        return bars, positions, positions < self.spec.positions_per_bar


def bar_grid(midi, end_tick: int, song_id: str, onsets: np.ndarray, durations: np.ndarray) -> Bars:
    """Bars from the time-signature map (4/4 where the file has none, as MIDI assumes). Where the map's bars are not
    the metre's (the signature was regrouped) or the file has no signature, the bar lines are placed on the
    downbeat the notes (``onsets``, ``durations`` in ticks) suggest (``downbeat_phase``), with a first, partial bar
    for notes before it."""
    ticks_per_beat = midi.ticks_per_beat
    if end_tick > MAX_BEATS * ticks_per_beat:
        raise MidiIngestError(song_id, "too_long", f"notes run to beat {end_tick // ticks_per_beat}; at most "
                              f"{MAX_BEATS} beats are read")
    signatures = sorted(midi.time_signature_changes, key=lambda s: s.time)
    segments = [(0, 4, 4)] if not signatures or signatures[0].time > 0 else []
    segments += [(s.time, s.numerator, s.denominator) for s in signatures]
    starts, lengths, spans = [], [], {}
    for index, (time, numerator, denominator) in enumerate(segments):
        name = f"{numerator}/{denominator}"
        if numerator <= 0 or denominator <= 0:
            raise MidiIngestError(song_id, "unsupported_metre", f"time signature {name} at tick {time} has no bars")
        until = segments[index + 1][0] if index + 1 < len(segments) else max(end_tick, time + 1)
        length = ticks_per_beat * 4 * numerator / denominator
        tick = float(time)
        while tick < until:
            starts.append(tick)
            lengths.append(length)
            tick += length
        spans[name] = spans.get(name, 0) + (until - time)
    main = max(spans, key=spans.get)
    regrouped = main not in METRES
    spec = METRES.get(main) or regrouped_metre(*map(int, main.split("/")))
    if spec is None:
        raise MidiIngestError(song_id, "unsupported_metre", f"time signature {main} covers most of the song; "
                              f"musicray knows {', '.join(METRES)} (and regroups other x/2, x/4 and 3n/8 ones)")
    if regrouped or not signatures:  # the map's bars are not musicray's, or it has none: bars of the metre
        length = ticks_per_beat * spec.beat_unit * spec.beats_per_bar
        phase = downbeat_phase(onsets, durations, ticks_per_beat, spec)
        first = phase - length if phase and np.any(onsets < phase) else phase
        starts = np.arange(first, max(end_tick, first + 1), length).tolist()
        lengths = [length] * len(starts)
    return Bars(spec, np.array(starts), np.array(lengths), ticks_per_beat * spec.beat_unit / spec.positions_per_beat,
                main)


def downbeat_phase(onsets: np.ndarray, durations: np.ndarray, ticks_per_beat: int, spec: Metre) -> int:
    """Ticks from tick 0 to the first downbeat: the beat of the bar (counted from tick 0) on which the notes that
    start on a beat sound longest in all (the chord and the bass change on the downbeat and are held). Chosen on
    34 POP909 songs without their annotations: it finds the annotators' downbeat in 28, where bars from tick 0 did
    in 16, the onset count in 21 and chorder's chord changes in 23 (docs/own_music.md)."""
    beat = ticks_per_beat * spec.beat_unit
    index = np.rint(onsets / beat).astype(np.int64)
    on_beat = np.abs(onsets - index * beat) < ON_BEAT_TOLERANCE * beat
    held = np.bincount(index[on_beat] % spec.beats_per_bar, weights=durations[on_beat], minlength=spec.beats_per_bar)
    return int(round(int(np.argmax(held)) * beat)) if held.any() else 0


def regrouped_metre(numerator: int, denominator: int) -> Metre | None:
    """The musicray metre whose beats a signature musicray lacks shares: quarter or half beats (1/4, 5/4, 2/2...)
    as 4/4 bars, dotted-quarter beats (9/8, 3/8...) as 12/8 or 6/8; None for other beats (7/8, 5/8...). Files of
    performances often carry such signatures by accident (POP909's say 1/4 or 2/4 for 4/4 songs)."""
    if denominator in (2, 4):
        return METRES["4/4"]
    if denominator == 8 and numerator % 3 == 0:
        return METRES["12/8" if numerator >= 12 else "6/8"]
    return None


def beat_phase(onsets: np.ndarray, ticks_per_beat: int) -> int:
    """Ticks by which the beats lie after the tick grid's beats: the most common onset position within a beat
    (smoothed over neighbouring bins); 0 for a file written on the grid."""
    if not len(onsets):
        return 0
    bins = np.rint((onsets % ticks_per_beat) / ticks_per_beat * PHASE_BINS).astype(int) % PHASE_BINS
    counts = np.bincount(bins, minlength=PHASE_BINS).astype(float)
    smoothed = counts + 0.5 * (np.roll(counts, 1) + np.roll(counts, -1))
    best = int(np.argmax(smoothed))
    # On the grid already when the grid's own beat is (nearly) as common as the best phase.
    if smoothed[0] >= 0.9 * smoothed[best]:
        return 0
    return round(best * ticks_per_beat / PHASE_BINS)


def grid_shift(phase: int, ticks_per_beat: int) -> int:
    """Ticks to add to every event to put the beats on the grid: back by the phase, or forward to the next beat
    when that is nearer (onsets played just ahead of the beat); what would move before the start stays at 0."""
    return -phase if phase <= ticks_per_beat // 2 else ticks_per_beat - phase


# -- track roles ---------------------------------------------------------------------------------------------------
@dataclass
class Line:
    """One pitched instrument of the file, as note arrays in ticks."""

    index: int
    name: str
    starts: np.ndarray
    ends: np.ndarray
    pitches: np.ndarray
    velocities: np.ndarray

    def overlap_share(self, ticks_per_beat: int) -> float:
        """Share of notes that start while an earlier note still sounds (by more than the legato tolerance)."""
        if len(self.starts) < 2:
            return 0.0
        order = np.lexsort((self.pitches, self.starts))
        running_end = np.maximum.accumulate(self.ends[order])[:-1]
        return float(np.mean(self.starts[order][1:] < running_end - OVERLAP_TOLERANCE_BEATS * ticks_per_beat))

    def coverage(self, bars: Bars) -> float:
        played = np.unique(bars.place(self.starts)[0])
        return len(played) / max(1, len(bars.starts))


def melody_score(line: Line, bars: Bars, ticks_per_beat: int) -> float:
    """How much a monophonic line sounds like the song's melody: loud (mean velocity, counted twice: a melody is
    mixed above the rest), playing through the song (coverage), and strictly one note at a time (a sung line never
    overlaps itself; a counter-melody on a keyboard does, a little). Chosen among six scores on 40 POP909 songs
    without their track names and checked on 40 others: 39 of 40 get their own MELODY in each set, where a score
    led by mean pitch got 33 and 36 (a BRIDGE often plays above the voice); docs/own_music.md."""
    return (2 * float(np.mean(line.velocities)) / 127 + line.coverage(bars)
            - OVERLAP_PENALTY * line.overlap_share(ticks_per_beat))


def skyline(line: Line) -> tuple[np.ndarray, np.ndarray]:
    """Masks (top, rest): the highest note of each onset, and the others."""
    order = np.lexsort((-line.pitches, line.starts))
    top = np.zeros(len(line.starts), dtype=bool)
    first = np.ones(len(order), dtype=bool)
    first[1:] = line.starts[order][1:] != line.starts[order][:-1]
    top[order[first]] = True
    return top, ~top


def _matches(line: Line, names: list[str]) -> bool:
    return any(name == str(line.index) or name.strip().lower() == line.name.strip().lower() for name in names)


def assign_roles(lines: list[Line], bars: Bars, ticks_per_beat: int, song_id: str,
                 given: dict[str, list[str]] | None = None) -> tuple[dict[str, list[tuple[Line, np.ndarray]]], dict]:
    """Track -> (line, mask of its notes) pieces; and what was decided, for the stats."""
    roles: dict[str, list[tuple[Line, np.ndarray]]] = {name: [] for name in TRACKS}
    if given:
        for track, names in given.items():
            for name in names:
                if not any(_matches(line, [name]) for line in lines):
                    raise MidiIngestError(song_id, "bad_roles",
                                          f"roles: {track}: no pitched instrument {name!r} (by index or name); has "
                                          f"{[f'{line.index}:{line.name}' for line in lines]}")
        for line in lines:
            track = next((t for t, names in given.items() if _matches(line, names)), "PIANO")
            roles[track].append((line, np.ones(len(line.starts), dtype=bool)))
        return roles, {"roles": "given"}
    monophonic = [line for line in lines if line.overlap_share(ticks_per_beat) <= MONOPHONIC_OVERLAP]
    ranked = sorted(monophonic, key=lambda line: melody_score(line, bars, ticks_per_beat), reverse=True)
    taken: set[int] = set()
    if ranked:
        melody = ranked[0]
        roles["MELODY"].append((melody, np.ones(len(melody.starts), dtype=bool)))
        taken.add(melody.index)
        bridge = next((line for line in ranked[1:]
                       if line.coverage(bars) >= BRIDGE_MIN_COVERAGE * melody.coverage(bars)), None)
        if bridge is not None:
            roles["BRIDGE"].append((bridge, np.ones(len(bridge.starts), dtype=bool)))
            taken.add(bridge.index)
    else:
        highest = max(lines, key=lambda line: float(np.mean(line.pitches)))
        top, rest = skyline(highest)
        roles["MELODY"].append((highest, top))
        roles["PIANO"].append((highest, rest))
        taken.add(highest.index)
    roles["PIANO"] += [(line, np.ones(len(line.starts), dtype=bool)) for line in lines if line.index not in taken]
    names = {track: [f"{line.index}:{line.name}" for line, _ in pieces] for track, pieces in roles.items()}
    return roles, {"roles": "skyline" if not ranked else "estimated", "instruments_by_track": names}


# -- key, chords, sections -----------------------------------------------------------------------------------------
def estimate_key(pitches: np.ndarray, durations: np.ndarray) -> str:
    """music21's key finding with the Aarden-Essen profiles on the pitch classes weighted by how long they sound
    (a stream of one note per pitch class carries that weighting; a stream of every note gives the same answer,
    slower). Of music21's six profiles it agreed most often with POP909's key_audio.txt: 51 of 60 songs, where
    Krumhansl-Schmuckler (music21's default) got 49 and the others 49 or fewer (docs/own_music.md)."""
    from music21 import analysis, note, stream

    weights = np.bincount(pitches % 12, weights=durations, minlength=12)
    profile = stream.Stream()
    for pitch_class, weight in enumerate(weights.tolist()):
        if weight > 0:
            profile.append(note.Note(60 + pitch_class, quarterLength=weight))
    # ``process`` gives the best (tonic, mode, correlation) alone; ``getSolution`` builds a Key object for each of
    # the 24 candidates besides (ten times the time, the same answer)
    (tonic, mode, _), _ = analysis.discrete.AardenEssen().process(profile.flatten())
    return f"{PITCH_CLASS_NAMES[tonic.pitchClass]}:{'min' if mode == 'minor' else 'maj'}"


def harte_label(chord) -> str:
    """A chorder Chord as a Harte label (``N`` where chorder found none)."""
    if not chord.is_complete():
        return NO_CHORD
    interval = (chord.bass_pc - chord.root_pc) % 12
    bass = CANONICAL_BASS_DEGREES[interval - 1] if interval else ""  # the degrees in order of semitones 1..11
    return chord_label(chord.root_pc, CHORDER_QUALITIES[chord.quality], bass)


def chorder_labels(midi, shift: int) -> list[str]:
    """chorder's chord (a Harte label) of each quarter note of the file's pitched notes moved by ``shift`` ticks.

    chorder is given the song in windows of CHORD_WINDOW_QUARTERS quarter notes, each note cut to its window:
    ``Dechorder.dechord`` looks the notes of each beat up in a list it rebuilds for every lookup, so its time grows
    with the square of the song's length (1.3 of 2.3 s for a POP909 song); cutting keeps every beat's notes and
    their durations in it, so the chords are the same, but where chorder's own shortcut (it looks back only ten
    onsets for notes still sounding) missed a long note that the window's cut brings back: 1 beat of 1,481 on four
    POP909 songs."""
    import miditoolkit
    from chorder import Dechorder

    ticks_per_beat = midi.ticks_per_beat
    notes = [(max(0, start + shift), max(1, end + shift), pitch, velocity)
             for instrument in midi.instruments if not instrument.is_drum
             for start, end, pitch, velocity in zip(instrument.starts.tolist(), instrument.ends.tolist(),
                                                    instrument.pitches.tolist(), instrument.velocities.tolist())
             if velocity > 0 and end > start]
    quarters = -(-max(end for _, end, _, _ in notes) // ticks_per_beat)
    window_ticks = CHORD_WINDOW_QUARTERS * ticks_per_beat
    labels: list[str] = []
    for first in range(0, quarters, CHORD_WINDOW_QUARTERS):
        start = first * ticks_per_beat
        window = miditoolkit.MidiFile(ticks_per_beat=ticks_per_beat)
        instrument = miditoolkit.Instrument(0, False, "pitched")
        instrument.notes = [miditoolkit.Note(velocity, pitch, max(begin, start) - start, min(end, start + window_ticks)
                                             - start)
                            for begin, end, pitch, velocity in notes if begin < start + window_ticks and end > start]
        window.instruments.append(instrument)
        window.max_tick = min(window_ticks, (quarters - first) * ticks_per_beat)
        found = [harte_label(chord) for chord in Dechorder.dechord(window)] if instrument.notes else []
        labels += (found + [NO_CHORD] * CHORD_WINDOW_QUARTERS)[:window.max_tick // ticks_per_beat]
    return labels


def estimate_chords(midi, shift: int, bars: Bars, n_bars: int) -> list[Chord]:
    """chorder's chord of each quarter note, taken at each beat of the song's metre, kept where it changes.
    chorder counts its quarters (and pairs them into half bars) from bar 0's downbeat."""
    origin = int(round(bars.starts[0]))
    per_quarter = chorder_labels(midi, shift - origin)
    spec = bars.spec
    chords: list[Chord] = []
    for bar in range(n_bars):
        for beat in range(spec.beats_per_bar):
            tick = bars.starts[bar] - origin + beat * spec.beat_unit * midi.ticks_per_beat \
                if bar < len(bars.starts) else None
            quarter = int(tick // midi.ticks_per_beat) if tick is not None else len(per_quarter)
            label = per_quarter[quarter] if quarter < len(per_quarter) else NO_CHORD
            if not chords or chords[-1].label != label:
                chords.append(Chord(bar, beat * spec.positions_per_beat, label))
    return chords


def _bar_melodies(melody: list[Note], n_bars: int) -> list[frozenset]:
    bars: list[set] = [set() for _ in range(n_bars)]
    for note in melody:
        bars[note.bar].add((note.position, note.pitch))
    return [frozenset(notes) for notes in bars]


def _similarity(a: list[frozenset], b: list[frozenset]) -> float:
    scores = [1.0 if not x and not y else len(x & y) / len(x | y) for x, y in zip(a, b)]
    return float(np.mean(scores)) if scores and len(a) == len(b) else 0.0


def estimate_sections(melody: list[Note], n_bars: int) -> list[Section]:
    """Intro and outro without melody; between them 8-bar phrases, labelled by repetition of their melody."""
    per_bar = _bar_melodies(melody, n_bars)
    sounding = [bar for bar in range(n_bars) if per_bar[bar]]
    first, last = (sounding[0], sounding[-1] + 1) if sounding else (0, n_bars)
    sections: list[Section] = []
    if first:
        sections += _cut(INTRO_LABEL, first)
    phrases = [(start, min(start + PHRASE_BARS, last)) for start in range(first, last, PHRASE_BARS)]
    if len(phrases) > 1 and phrases[-1][1] - phrases[-1][0] < PHRASE_BARS // 2:  # a short tail joins its phrase
        phrases[-2:] = [(phrases[-2][0], phrases[-1][1])]
    labelled: list[tuple[str, list[frozenset]]] = []
    for start, end in phrases:
        bars = per_bar[start:end]
        if not any(bars):
            label = NON_MELODIC_LABEL
        else:
            label = next((name for name, seen in labelled if _similarity(bars, seen[:len(bars)]) >= PHRASE_SIMILARITY),
                         None)
            if label is None:
                used = {name for name, _ in labelled}
                label = next((name for name in MELODIC_LABELS if name not in used), OTHER_MELODIC_LABEL)
                labelled.append((label, bars))
        sections += _cut(label, end - start)
    if last < n_bars:
        sections += _cut(OUTRO_LABEL, n_bars - last)
    return sections


def _cut(label: str, bars: int) -> list[Section]:
    full, rest = divmod(bars, MAX_SECTION_BARS)
    return [Section(label, MAX_SECTION_BARS)] * full + ([Section(label, rest)] if rest else [])


# -- one song ------------------------------------------------------------------------------------------------------
def load_midi_song(data: bytes, song_id: str, roles: dict[str, list[str]] | None = None) -> tuple[Song, dict]:
    """One MIDI file as a checked Song with estimated key, chords, roles and sections, and stats on what was
    kept and dropped. Raises MidiIngestError (reason in SKIP_REASONS)."""
    midi = _parse(data, song_id)
    drums = [i for i in midi.instruments if i.is_drum]
    lines = []
    for index, instrument in enumerate(midi.instruments):
        if instrument.is_drum:
            continue
        sounding = (instrument.velocities > 0) & (instrument.ends > instrument.starts)
        if sounding.any():
            lines.append(Line(index, instrument.name or "", instrument.starts[sounding], instrument.ends[sounding],
                              instrument.pitches[sounding], instrument.velocities[sounding]))
    if not lines:
        detail = f"only drums ({sum(len(i.starts) for i in drums)} notes)" if drums else "no notes"
        raise MidiIngestError(song_id, "no_notes", detail)
    ticks_per_beat = midi.ticks_per_beat
    shift = grid_shift(beat_phase(np.concatenate([line.starts for line in lines]), ticks_per_beat), ticks_per_beat)
    for line in lines:
        line.starts, line.ends = np.maximum(0, line.starts + shift), np.maximum(1, line.ends + shift)
    end_tick = int(max(line.ends.max() for line in lines))
    bars = bar_grid(midi, end_tick, song_id, np.concatenate([line.starts for line in lines]),
                    np.concatenate([line.ends - line.starts for line in lines]))
    spec = bars.spec
    roles_by_track, role_stats = assign_roles(lines, bars, ticks_per_beat, song_id, roles)

    tracks: dict[str, list[Note]] = {}
    dropped_odd, merged = 0, 0
    for track in TRACKS:
        rows = []
        for line, mask in roles_by_track[track]:
            bar, position, fits = bars.place(line.starts[mask])
            end_bar, end_position, _ = bars.place(line.ends[mask])
            steps = bar * spec.positions_per_bar + position
            durations = np.maximum(1, end_bar * spec.positions_per_bar + end_position - steps)
            dropped_odd += int(np.count_nonzero(~fits))
            rows.append(np.column_stack([steps, line.pitches[mask], durations,
                                         np.clip(line.velocities[mask], 1, 127)])[fits])
        stacked = np.concatenate(rows) if rows else np.zeros((0, 4), dtype=np.int64)
        kept = one_per_onset_and_pitch_rows(stacked.astype(np.int64))
        merged += len(stacked) - len(kept)
        bar, position = np.divmod(kept[:, 0], spec.positions_per_bar)
        tracks[track] = notes_from_rows(np.column_stack([bar, position, kept[:, 1:]]))
    last_step = max((n.bar * spec.positions_per_bar + n.position for notes in tracks.values() for n in notes),
                    default=None)
    if last_step is None:
        raise MidiIngestError(song_id, "no_notes", f"all {dropped_odd} notes lie in bars of another metre than "
                              f"{spec.name}")
    n_bars = last_step // spec.positions_per_bar + 1

    all_pitches = np.concatenate([line.pitches for line in lines])
    all_lengths = np.concatenate([line.ends - line.starts for line in lines]).astype(float)
    key = estimate_key(all_pitches, all_lengths)
    sections = estimate_sections(tracks["MELODY"], n_bars)
    chords = estimate_chords(midi, shift, bars, n_bars)
    tempos = []
    for change in sorted(midi.tempo_changes, key=lambda t: t.time):
        # The tempo the file starts with stays at the start (bar 0's downbeat, which a first, partial bar puts before
        # tick 0); later ones move with the notes.
        bar, position, fits = (bars.place(np.array([max(0, change.time + shift)])) if change.time else
                               (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), np.ones(1, dtype=bool)))
        if fits[0] and bar[0] < n_bars and change.tempo > 0:
            tempo = Tempo(int(bar[0]), int(position[0]), round(change.tempo / spec.beat_unit, 3))
            tempos = [t for t in tempos if (t.bar, t.position) != (tempo.bar, tempo.position)] + [tempo]
    song = Song(song_id=song_id, key=key, metre=spec.name, sections=sections, chords=chords, tracks=tracks,
                tempos=tempos)
    song = song.replace(tracks={name: [song.inside_form(n) for n in notes] for name, notes in tracks.items()})
    song.check()
    stats = {
        "notes_total": int(sum(len(line.starts) for line in lines)),
        "notes_kept": sum(len(notes) for notes in song.tracks.values()),
        "bars": n_bars,
        "dropped": {"drum_notes": sum(len(i.starts) for i in drums), "notes_in_bars_of_another_metre": dropped_odd,
                    "notes_merged_on_one_onset_and_pitch": merged},
        "drum_tracks": len(drums),
        "beat_phase_shift_ticks": int(shift),
        "first_bar_tick": int(round(bars.starts[0])),  # bar 0's downbeat, in ticks after the shift
        "time_signature": bars.signature,
        **role_stats,
    }
    return song, stats
