"""Lossless ingest of POP909 with its phrase-structure annotations into :class:`musicray.song.Song`.

One call, :func:`load_song`, turns one song's files into a checked Song plus a stats dict; it reads nothing but
that song's files (and the index when no index row is passed), so a parallel job can map it over song ids.
Everything is kept as performed: raw velocities, one tempo per beat. Only time is quantized, to the grid of
the song's metre (``musicray.song.METRES``; docs/quantization.md measures it).

Where the bars are. The phrase labels (``structure/<id>/human_label1.txt``) count bars of the annotators' own
bar grid, and that grid is not the downbeat column of ``beat_midi.txt``: that column flips phase every ~50
beats in many songs, and in about a third of the songs the annotated bar 0 is none of its downbeats. The
annotators' grid is written down, though, in ``structure/<id>/melody.txt``: their quantized melody, four 16ths
per beat row of ``beat_midi.txt``, starting on their bar 0. So the grid is recovered by aligning that melody to
the MIDI melody on the beat rows of ``beat_midi.txt``, bar by bar (:func:`align_bars`). Each labelled bar gets
an offset in beat rows, constant in 80% of the songs; elsewhere it steps where the annotators left beats out
(a half bar, a stray beat), and the MIDI notes on those beats belong to no bar and are dropped (counted), or,
rarely, steps back where they padded a short bar to a full one. docs/quantization.md has the figures.

The PIANO track's sustain-pedal control changes are ignored: Song has no pedal, and note durations are the
key-held durations.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import symusic

from musicray.harmony import NO_CHORD, canonical_chord, canonical_key
from musicray.song import (METRES, TRACKS, Chord, Metre, Note, Section, Song, SongError, Tempo,
                           notes_from_rows, one_per_onset_and_pitch_rows, parse_form)

POP909_DIR_ENV = "POP909_DIR"

# (num_beats_per_measure, num_quavers_per_beat) of index.xlsx -> metre. A beat_midi.txt row is one beat of the
# metre: a quarter in 4/4 and 3/4, a dotted quarter in 12/8 (three quavers). (3, 3) is only song 624, whose
# beat rows are ~1.6 s apart and whose labels fit none of our metres: it is left out as unsupported_metre.
INDEX_METRES: dict[tuple[int, int], str] = {
    (2, 2): "4/4",
    (3, 2): "3/4",
    (2, 3): "12/8",
}

# Paths of one song's files, relative to the dataset root.
SONG_FILES: dict[str, str] = {
    "midi": "POP909/{id}/{id}.mid",
    "beats": "POP909/{id}/beat_midi.txt",
    "chords": "POP909/{id}/chord_midi.txt",
    "form": "structure/{id}/human_label1.txt",
    "melody": "structure/{id}/melody.txt",
    "key": "structure/{id}/analyzed_key.txt",
}
INDEX_FILE = "POP909/index.xlsx"

# Why a song was left out: short stable codes (used as dict keys in stats and docs) and what they mean.
SKIP_REASONS: dict[str, str] = {
    "missing_file": "a file the song needs is absent",
    "unreadable_file": "a text file has the wrong columns or values",
    "unreadable_midi": "the MIDI file cannot be parsed",
    # A track without notes counts as a missing one (no POP909 track is empty).
    "missing_track": "the MIDI lacks notes on one of the MELODY, BRIDGE, PIANO tracks",
    "unsupported_metre": "index.xlsx gives a metre with no musicray metre",
    "bad_form": "human_label1.txt is not a form parse_form accepts",
    "unaligned": "the annotators' melody cannot be aligned to the MIDI melody",
    "label_grid_mismatch": "the labelled bars run past the beats of beat_midi.txt",
    "unknown_chord": "chord_midi.txt has a chord quality musicray does not know",
    "bad_key": "analyzed_key.txt has no key canonical_key accepts",
    "notes_outside_form": "too many notes fall outside the labelled bars",
    "off_grid": "too many onsets sit far from the metre's grid (the beat rows or the metre do not fit the music)",
}

# Alignment of the annotators' melody (in beat rows): a reference note matches a MIDI melody note of the same
# pitch whose onset is within MATCH_TOLERANCE beats of where the offset puts it. A bar-to-bar offset change
# costs OFFSET_CHANGE_PENALTY matched notes (so a stray note or two never move the grid) and may skip at most
# MAX_OFFSET_STEP_BARS bars at once (observed steps are 1..4 beats; longer ones would be jumps to a repeated
# chorus).
MATCH_TOLERANCE = 0.3
OFFSET_CHANGE_PENALTY = 4.0
MAX_OFFSET_STEP_BARS = 2
REFERENCE_STEPS_PER_BEAT = 4  # melody.txt durations are 16ths of a beat_midi.txt row, whatever the metre

# Acceptance thresholds, chosen from a full run over the 909 songs (docs/quantization.md): 98% of the songs align
# >= 99% of their reference melody, the lowest kept ones 73%, the rejected ones 36% or less; labelled bars may
# run at most one bar past the last beat (the last bar is often rounded up); more than 10% of the notes outside
# the labelled bars (the kept maximum is 9.4%) means labels that do not describe the song.
MIN_ALIGNED_FRACTION = 0.6
MAX_OVERHANG_BARS = 1
MAX_NOTES_OUTSIDE_FRACTION = 0.10
# An onset is "moved" when rounding it to the grid shifts it by more than 30 ms (about a 64th at 120 bpm; well
# above the MIDI's timing resolution). The median song moves 2% of its onsets; above a quarter of them the
# song's rhythm (32nd-note runs on a half-tempo beat track, a 12/8 index entry for a duplet song) is not the
# one the grid would record.
DISPLACEMENT_LIMIT_S = 0.030
MAX_MOVED_FRACTION = 0.25


class IngestError(SongError):
    """A POP909 song that cannot be ingested; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, song_id: str, reason: str, path: str, field: str, detail: str):
        self.song_id, self.reason, self.path, self.field, self.detail = song_id, reason, path, field, detail
        super().__init__(f"song {song_id}: {path}: {field}: {detail}")

    def __reduce__(self):
        # Exceptions pickle through self.args (the message alone); Ray ships errors between processes.
        return type(self), (self.song_id, self.reason, self.path, self.field, self.detail)


def default_pop909_dir() -> Path:
    """``$POP909_DIR``, else ``shared/datasets/pop909`` beside the project root."""
    env = os.environ.get(POP909_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "pop909"


def normalise_song_id(song_id: str | int) -> str:
    return f"{int(song_id):03d}"


def index_metre(beats_per_measure: int, quavers_per_beat: int) -> str | None:
    return INDEX_METRES.get((int(beats_per_measure), int(quavers_per_beat)))


def read_index(root: Path) -> "pandas.DataFrame":
    """index.xlsx with song_id as a 3-character string and a ``metre`` column (None where unsupported)."""
    import pandas as pd   # here, not at the top: Ray workers load songs without pandas (0.4 CPU-s to import)

    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise IngestError("index", "missing_file", INDEX_FILE, "index", "file not found")
    index = pd.read_excel(path)
    index["song_id"] = index["song_id"].map(normalise_song_id)
    index["metre"] = [index_metre(b, q) for b, q in zip(index["num_beats_per_measure"], index["num_quavers_per_beat"])]
    return index


@functools.lru_cache(maxsize=4)
def _index_rows(root: str) -> dict[str, dict]:
    return {row["song_id"]: row for row in read_index(Path(root)).to_dict("records")}


def metre_rows(root: Path) -> dict[str, dict]:
    """What ``load_song`` reads of each song's index row (its ``index_row``), by song id: small enough to send
    to the Ray workers, so that none reads index.xlsx itself (pandas and openpyxl: about 0.8 CPU-s a worker)."""
    fields = ("metre", "num_beats_per_measure", "num_quavers_per_beat")
    return {song_id: {name: row[name] for name in fields} for song_id, row in _index_rows(str(root)).items()}


def song_ids(root: Path) -> list[str]:
    return sorted(_index_rows(str(root)))


# -- reading one song's files --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SongFiles:
    root: Path
    song_id: str

    def relative(self, kind: str) -> str:
        return SONG_FILES[kind].format(id=self.song_id)

    def path(self, kind: str) -> Path:
        path = self.root / self.relative(kind)
        if not path.is_file():
            raise self.error("missing_file", kind, "file", "file not found")
        return path

    def error(self, reason: str, kind: str, field: str, detail: str) -> IngestError:
        return IngestError(self.song_id, reason, self.relative(kind), field, detail)

    def table(self, kind: str, field: str, names: list[str], sep: str | None) -> dict[str, list[str]]:
        """A headerless text table with exactly ``names`` as columns, as a list of strings per column; ``sep``
        None splits on runs of whitespace, and blank lines are skipped. str.split, not pandas.read_csv, which
        took longer than the rest of the file's reading (2 to 3 ms a file) and parsed the same floats."""
        rows = [line.split(sep) for line in self.text(kind, field).splitlines() if line.strip()]
        if not rows:
            raise self.error("unreadable_file", kind, field, "cannot read table: no rows")
        if set(map(len, rows)) != {len(names)}:   # one pass in C; the loop only to name the first bad row
            for number, row in enumerate(rows, start=1):
                if len(row) != len(names):
                    raise self.error("unreadable_file", kind, field,
                                     f"expected {len(names)} columns, found {len(row)} in row {number}")
        return {name: list(column) for name, column in zip(names, zip(*rows))}

    def numbers(self, kind: str, field: str, values: list[str], dtype: type, detail: str) -> np.ndarray:
        try:
            return np.array(values, dtype=dtype)
        except ValueError:
            raise self.error("unreadable_file", kind, field, detail) from None

    def text(self, kind: str, field: str = "text") -> str:
        try:
            return self.path(kind).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise self.error("unreadable_file", kind, field, str(err)) from None


def read_metre(files: SongFiles, index_row: dict | None) -> Metre:
    row = index_row if index_row is not None else _index_rows(str(files.root)).get(files.song_id)
    if row is None:
        raise IngestError(files.song_id, "missing_file", INDEX_FILE, "song_id", "song not in the index")
    name = row.get("metre")
    if not isinstance(name, str):
        name = index_metre(row["num_beats_per_measure"], row["num_quavers_per_beat"])
    if name is None:
        raise IngestError(files.song_id, "unsupported_metre", INDEX_FILE, "num_beats_per_measure",
                          f"({row['num_beats_per_measure']}, {row['num_quavers_per_beat']}) beats/quavers has no "
                          f"musicray metre; supported: {INDEX_METRES}")
    return METRES[name]


def read_form(files: SongFiles) -> list[Section]:
    text = files.text("form")
    try:
        return parse_form(text.strip())
    except SongError as err:
        raise files.error("bad_form", "form", "form", str(err).removeprefix("form: ")) from None


def read_key(files: SongFiles) -> tuple[str, int]:
    """The first key of analyzed_key.txt and how many further keys (modulations) it lists."""
    keys = [line.strip() for line in files.text("key").splitlines() if line.strip()]
    if not keys:
        raise files.error("bad_key", "key", "key", "no key in file")
    try:
        return canonical_key(keys[0]), len(keys) - 1
    except SongError as err:
        raise files.error("bad_key", "key", "key", str(err).removeprefix("key: ")) from None


def read_beat_times(files: SongFiles) -> np.ndarray:
    beats = files.table("beats", "beat", ["seconds", "every_second_beat", "downbeat"], sep=None)
    detail = "beat times must be >= 2 increasing numbers"
    times = files.numbers("beats", "beat", beats["seconds"], float, detail)
    if len(times) < 2 or not np.all(np.isfinite(times)) or not np.all(np.diff(times) > 0):
        raise files.error("unreadable_file", "beats", "beat", detail)
    return times


def read_chord_changes(files: SongFiles) -> tuple[np.ndarray, list[str]]:
    """Start time (s) and canonical label of every chord_midi.txt row."""
    table = files.table("chords", "chord", ["start", "end", "label"], sep="\t")
    detail = "chord start times must be numbers"
    starts = files.numbers("chords", "chord", table["start"], float, detail)
    if not np.all(np.isfinite(starts)):
        raise files.error("unreadable_file", "chords", "chord", detail)
    labels = []
    for row, label in enumerate(table["label"], start=1):
        try:
            labels.append(canonical_chord(label.strip()))
        except SongError as err:
            raise files.error("unknown_chord", "chords", "chord", f"line {row}: {str(err).removeprefix('chord: ')}") \
                from None
    return starts, labels


def read_reference_melody(files: SongFiles) -> tuple[np.ndarray, np.ndarray]:
    """The annotators' quantized melody: onsets in beat rows from their bar 0, and pitches (rests left out)."""
    table = files.table("melody", "melody", ["pitch", "duration"], sep=None)
    detail = "pitch and duration must be integers"
    pitches = files.numbers("melody", "melody", table["pitch"], np.int64, detail)
    durations = files.numbers("melody", "melody", table["duration"], np.int64, detail)
    onsets = np.concatenate([[0], np.cumsum(durations)[:-1]]) / REFERENCE_STEPS_PER_BEAT
    sounding = pitches > 0
    return onsets[sounding], pitches[sounding]


@dataclass(frozen=True)
class PerformedTrack:
    """One MIDI track's notes as performed, as parallel arrays (entry i is note i): times in seconds."""

    starts: np.ndarray
    ends: np.ndarray
    pitches: np.ndarray
    velocities: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


def tick_seconds(ticks_per_beat: int, tempo_changes: list[tuple[int, int]], ticks: np.ndarray) -> np.ndarray:
    """Seconds at each MIDI tick, computed exactly as miditoolkit's tick-to-time mapping (the reader the ingest
    used before symusic), so that every performed time, and so every quantized note, stays bit for bit the same.

    ``tempo_changes`` are (tick, microseconds per quarter) in file order. As miditoolkit: 120 bpm until the first
    change, a change at tick 0 replaces everything before it, a change to the tempo already sounding is dropped
    (it would split the running sum, which rounds differently), and each tempo's span adds its ticks times its
    seconds per tick, in float64, to the time its span starts at.
    """
    span_ticks, span_bpms = [0], [120.0]
    for tick, microseconds in tempo_changes:
        bpm = 60 * 1e6 / microseconds * 4 / 4  # mido.tempo2bpm, operation for operation
        if tick == 0:
            span_ticks, span_bpms = [0], [bpm]
        elif bpm != span_bpms[-1]:
            span_ticks.append(tick)
            span_bpms.append(bpm)
    seconds_per_tick = np.array([60 / bpm / float(ticks_per_beat) for bpm in span_bpms])
    span_starts_s = np.zeros(len(span_ticks))
    for span in range(1, len(span_ticks)):
        span_starts_s[span] = span_starts_s[span - 1] + seconds_per_tick[span - 1] * (span_ticks[span] -
                                                                                      span_ticks[span - 1])
    starts = np.asarray(span_ticks)
    span = np.searchsorted(starts, ticks, side="right") - 1
    return span_starts_s[span] + seconds_per_tick[span] * (ticks - starts[span])


def read_midi(files: SongFiles) -> dict[str, PerformedTrack]:
    """The notes of the MELODY, BRIDGE and PIANO tracks, read with symusic (C++; about 10x faster than
    miditoolkit + mido, which parsed every event in Python)."""
    path = files.path("midi")
    try:
        score = symusic.Score(str(path), ttype="tick")
    except Exception as err:  # symusic raises RuntimeError on a malformed file; keep any other failure a skip too
        raise files.error("unreadable_midi", "midi", "midi", f"{type(err).__name__}: {err}") from None
    # Tracks without notes count as absent, as they did with miditoolkit (which lists only tracks with notes).
    by_name = {track.name.strip().upper(): track for track in score.tracks if len(track.notes)}
    missing = [name for name in TRACKS if name not in by_name]
    if missing:
        raise files.error("missing_track", "midi", "track",
                          f"no notes on {missing}; tracks with notes: {sorted(by_name)}")
    tempo_changes = [(tempo.time, tempo.mspq) for tempo in score.tempos]
    tracks = {}
    for name in TRACKS:
        notes = by_name[name].notes.numpy()
        onsets = notes["time"].astype(np.int64)
        offsets = onsets + notes["duration"]
        tracks[name] = PerformedTrack(tick_seconds(score.ticks_per_quarter, tempo_changes, onsets),
                                      tick_seconds(score.ticks_per_quarter, tempo_changes, offsets),
                                      notes["pitch"].astype(np.int64), notes["velocity"].astype(np.int64))
    return tracks


# -- time: seconds <-> beat rows <-> (bar, position) ---------------------------------------------------------------
def seconds_to_rows(beat_times: np.ndarray, seconds) -> np.ndarray:
    """Fractional beat-row index; linear between beats, extended with the first/last interval outside them."""
    seconds = np.asarray(seconds, float)
    rows = np.interp(seconds, beat_times, np.arange(len(beat_times), dtype=float))
    before = (seconds - beat_times[0]) / (beat_times[1] - beat_times[0])
    after = len(beat_times) - 1 + (seconds - beat_times[-1]) / (beat_times[-1] - beat_times[-2])
    return np.where(seconds < beat_times[0], before, np.where(seconds > beat_times[-1], after, rows))


def rows_to_seconds(beat_times: np.ndarray, rows) -> np.ndarray:
    rows = np.asarray(rows, float)
    n = len(beat_times)
    seconds = np.interp(rows, np.arange(n, dtype=float), beat_times)
    before = beat_times[0] + rows * (beat_times[1] - beat_times[0])
    after = beat_times[-1] + (rows - (n - 1)) * (beat_times[-1] - beat_times[-2])
    return np.where(rows < 0, before, np.where(rows > n - 1, after, seconds))


@dataclass(frozen=True)
class BarGrid:
    """The labelled bars on the beat rows of beat_midi.txt: ``bar_rows[k]`` is the row of bar k's downbeat."""

    beat_times: np.ndarray
    bar_rows: np.ndarray
    spec: Metre

    @property
    def n_bars(self) -> int:
        return len(self.bar_rows)

    def beat_rows(self) -> np.ndarray:
        """Beat row of every beat of the labelled bars, in order."""
        return (self.bar_rows[:, None] + np.arange(self.spec.beats_per_bar)[None, :]).ravel()

    def grid_steps(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest grid step (from bar 0's downbeat) of each fractional row, and whether it lies in a labelled bar.

        Each row is read against the bar whose downbeat (less half a step, so that an early downbeat counts) is
        the last one at or before it; a row past that bar's end sits in beats the labels left out, or after
        the last bar, or before bar 0.
        """
        ppb, spec = self.spec.positions_per_beat, self.spec
        half_step = 0.5 / ppb
        bar = np.searchsorted(self.bar_rows - half_step, rows, side="right") - 1
        inside = bar >= 0
        bar = np.clip(bar, 0, self.n_bars - 1)
        offset_rows = self.bar_rows[bar] - bar * spec.beats_per_bar
        steps = np.rint((rows - offset_rows) * ppb).astype(int)
        inside &= (steps >= bar * spec.positions_per_bar) & (steps < (bar + 1) * spec.positions_per_bar)
        return steps, inside

    def steps_to_rows(self, steps: np.ndarray) -> np.ndarray:
        bar = np.clip(steps // self.spec.positions_per_bar, 0, self.n_bars - 1)
        return self.bar_rows[bar] - bar * self.spec.beats_per_bar + steps / self.spec.positions_per_beat


@dataclass(frozen=True)
class Alignment:
    bar_rows: np.ndarray
    matched: int
    reference_notes: int
    offset_changes: int

    @property
    def fraction(self) -> float:
        return self.matched / max(1, self.reference_notes)


def align_bars(reference_onsets: np.ndarray, reference_pitches: np.ndarray, midi_rows: np.ndarray,
               midi_pitches: np.ndarray, n_bars: int, beats_per_bar: int, n_rows: int) -> Alignment:
    """Best row offset of each labelled bar, by matching the reference melody to the MIDI melody.

    Dynamic programming over bars maximises the matched reference notes less OFFSET_CHANGE_PENALTY per change.
    """
    first_offset = -beats_per_bar  # bar 0 may start up to a bar before the first beat row (an early pickup)
    offsets = np.arange(first_offset, n_rows)
    in_form = reference_onsets < n_bars * beats_per_bar
    score = match_scores(reference_onsets[in_form], reference_pitches[in_form], midi_rows, midi_pitches,
                         n_bars, beats_per_bar, first_offset, len(offsets))
    chosen = best_offset_path(score, beats_per_bar)
    matched = int(score[np.arange(n_bars), chosen].sum())
    bar_rows = offsets[chosen] + np.arange(n_bars) * beats_per_bar
    return Alignment(bar_rows, matched, int(in_form.sum()), int(np.count_nonzero(np.diff(chosen))))


def match_scores(reference_onsets: np.ndarray, reference_pitches: np.ndarray, midi_rows: np.ndarray,
                 midi_pitches: np.ndarray, n_bars: int, beats_per_bar: int, first_offset: int,
                 n_offsets: int) -> np.ndarray:
    """``score[bar, i]``: how many reference notes of ``bar`` a MIDI note of the same pitch matches when the
    bar is shifted by offset ``first_offset + i`` rows (a note counts once per offset, however many match).

    All (reference note, MIDI note of its pitch) pairs at once: a Python loop over the reference notes was a
    fifth of the ingest's time.
    """
    order = np.argsort(midi_pitches, kind="stable")
    sorted_pitches, sorted_rows = midi_pitches[order], midi_rows[order]
    first = np.searchsorted(sorted_pitches, reference_pitches, side="left")
    counts = np.searchsorted(sorted_pitches, reference_pitches, side="right") - first
    reference = np.repeat(np.arange(len(reference_onsets)), counts)
    # Each pair's MIDI note: its reference note's first same-pitch note, plus the pair's rank among that note's.
    rank = np.arange(len(reference)) - np.repeat(np.cumsum(counts) - counts, counts)
    shifts = sorted_rows[np.repeat(first, counts) + rank] - reference_onsets[reference]
    nearest = np.rint(shifts)
    close = np.abs(shifts - nearest) < MATCH_TOLERANCE
    hit_offsets = nearest[close].astype(int) - first_offset
    hit_references = reference[close]
    in_range = (hit_offsets >= 0) & (hit_offsets < n_offsets)
    hits = np.unique(hit_references[in_range] * n_offsets + hit_offsets[in_range])
    bars = (reference_onsets // beats_per_bar).astype(int)
    cells = bars[hits // n_offsets] * n_offsets + hits % n_offsets
    return np.bincount(cells, minlength=n_bars * n_offsets).reshape(n_bars, n_offsets).astype(float)


def best_offset_path(score: np.ndarray, beats_per_bar: int) -> np.ndarray:
    """Index of each bar's offset on the path of highest score less OFFSET_CHANGE_PENALTY per change.

    Offsets may grow (annotators left beats out) by up to MAX_OFFSET_STEP_BARS bars, or shrink by less than a
    bar (they padded a short bar to a full one), so bar downbeats stay strictly increasing rows. Ties go to
    staying, then to the first step in ``steps`` order (np.argmax takes the first maximum).
    """
    n_bars, n_offsets = score.shape
    steps = np.array([step for step in range(-(beats_per_bar - 1), MAX_OFFSET_STEP_BARS * beats_per_bar + 1)
                      if step])
    stay = np.arange(n_offsets)
    # Row 0 of the candidates stays on the offset; row 1 + j comes from offset index (i - steps[j]), which a
    # padded copy of the running total answers with -inf where it lies outside the offsets.
    origins = np.vstack([stay, stay[None, :] - steps[:, None]])
    pad = int(steps.max())
    padded = np.full(n_offsets + pad - int(steps.min()), -np.inf)
    padded_origins = origins[1:] + pad
    candidates = np.empty((len(steps) + 1, n_offsets))
    total = score[0].copy()
    came_from = np.zeros((n_bars, n_offsets), dtype=int)
    for bar in range(1, n_bars):
        padded[pad:pad + n_offsets] = total
        candidates[0] = total
        np.subtract(padded[padded_origins], OFFSET_CHANGE_PENALTY, out=candidates[1:])
        pick = np.argmax(candidates, axis=0)
        total = candidates[pick, stay] + score[bar]
        came_from[bar] = origins[pick, stay]
    chosen = np.empty(n_bars, dtype=int)
    chosen[-1] = int(np.argmax(total))
    for bar in range(n_bars - 1, 0, -1):
        chosen[bar - 1] = came_from[bar, chosen[bar]]
    return chosen


# -- placing events on the grid ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlacedTrack:
    notes: list[Note]
    performed: int  # notes in the MIDI track
    outside: int  # of those, onsets outside the labelled bars: dropped
    merged: int  # kept notes that landed on the (bar, position, pitch) of another one and were merged into it
    displacement_s: np.ndarray  # |grid time - performed time| of each onset inside the bars


def place_notes(grid: BarGrid, notes: PerformedTrack) -> PlacedTrack:
    start_rows = seconds_to_rows(grid.beat_times, notes.starts)
    steps, inside = grid.grid_steps(start_rows)
    # Measured on beat rows, not bars, so a note held over beats the labels left out keeps its played length.
    ppb = grid.spec.positions_per_beat
    end_rows = seconds_to_rows(grid.beat_times, notes.ends)
    durations = np.maximum(1, np.rint(end_rows * ppb) - np.rint(start_rows * ppb)).astype(int)
    displacement = np.abs(rows_to_seconds(grid.beat_times, grid.steps_to_rows(steps)) - notes.starts)
    # Two notes of one pitch on one grid step cannot both sound (the MIDI itself has exact duplicates, and
    # quantization joins fast repeats): the longest, then loudest, is kept.
    kept = one_per_onset_and_pitch_rows(np.stack([steps[inside], notes.pitches[inside], durations[inside],
                                                  notes.velocities[inside]], axis=1).astype(np.int64))
    bars, positions = np.divmod(kept[:, 0], grid.spec.positions_per_bar)
    placed = notes_from_rows(np.column_stack([bars, positions, kept[:, 1:]]))
    inside_count = int(np.count_nonzero(inside))
    return PlacedTrack(placed, len(notes), len(notes) - inside_count, inside_count - len(placed),
                       displacement[inside])


def place_chords(grid: BarGrid, starts: np.ndarray, labels: list[str]) -> list[Chord]:
    """The chord sounding at every labelled beat (chords sit on beats), as a list of changes from bar 0."""
    change_rows = np.rint(seconds_to_rows(grid.beat_times, starts))
    order = np.argsort(change_rows, kind="stable")
    change_rows, labels = change_rows[order], [labels[i] for i in order]
    sounding = np.searchsorted(change_rows, grid.beat_rows(), side="right") - 1
    chords: list[Chord] = []
    for beat, index in enumerate(sounding):
        label = labels[index] if index >= 0 else NO_CHORD
        if not chords or chords[-1].label != label:
            bar, beat_in_bar = divmod(beat, grid.spec.beats_per_bar)
            chords.append(Chord(bar, beat_in_bar * grid.spec.positions_per_beat, label))
    return chords


def place_tempos(grid: BarGrid) -> list[Tempo]:
    """One tempo per labelled beat: 60 / the length of its beat row (the last row repeats the one before)."""
    intervals = np.diff(grid.beat_times)
    rows = np.clip(grid.beat_rows(), 0, len(intervals) - 1)
    beats, positions_per_beat = grid.spec.beats_per_bar, grid.spec.positions_per_beat
    return [Tempo(beat // beats, beat % beats * positions_per_beat, round(bpm, 3))
            for beat, bpm in enumerate((60.0 / intervals[rows]).tolist())]


# -- one song ------------------------------------------------------------------------------------------------------
def find_bar_grid(files: SongFiles, spec: Metre, sections: list[Section], beat_times: np.ndarray,
                  melody: PerformedTrack) -> tuple[BarGrid, Alignment]:
    reference_onsets, reference_pitches = read_reference_melody(files)
    n_bars = sum(section.bars for section in sections)
    melody_rows = seconds_to_rows(beat_times, melody.starts)
    alignment = align_bars(reference_onsets, reference_pitches, melody_rows, melody.pitches, n_bars,
                           spec.beats_per_bar, len(beat_times))
    if alignment.fraction < MIN_ALIGNED_FRACTION:
        raise files.error("unaligned", "melody", "melody",
                          f"only {alignment.matched} of {alignment.reference_notes} notes "
                          f"({alignment.fraction:.0%}) match the MIDI MELODY; need {MIN_ALIGNED_FRACTION:.0%}")
    overhang_beats = alignment.bar_rows[-1] + spec.beats_per_bar - len(beat_times)
    if overhang_beats > MAX_OVERHANG_BARS * spec.beats_per_bar:
        raise files.error("label_grid_mismatch", "form", "form",
                          f"{n_bars} labelled bars end {overhang_beats} beats after the last of the "
                          f"{len(beat_times)} beats of {files.relative('beats')}; allowed {MAX_OVERHANG_BARS} bar")
    return BarGrid(beat_times, alignment.bar_rows, spec), alignment


def load_song(root: Path, song_id: str | int, index_row: dict | None = None) -> tuple[Song, dict]:
    """One POP909 song as a checked Song, and stats on what the ingest moved or dropped.

    Raises IngestError (reason in SKIP_REASONS) when the song cannot be represented faithfully.
    """
    files = SongFiles(Path(root), normalise_song_id(song_id))
    spec = read_metre(files, index_row)
    sections = read_form(files)
    key, key_changes = read_key(files)
    chord_starts, chord_labels = read_chord_changes(files)
    beat_times = read_beat_times(files)
    performed = read_midi(files)
    grid, alignment = find_bar_grid(files, spec, sections, beat_times, performed["MELODY"])

    placed = {name: place_notes(grid, performed[name]) for name in TRACKS}
    notes_total = sum(track.performed for track in placed.values())
    notes_outside = sum(track.outside for track in placed.values())
    if notes_outside > MAX_NOTES_OUTSIDE_FRACTION * notes_total:
        raise files.error("notes_outside_form", "form", "form",
                          f"{notes_outside} of {notes_total} notes fall outside the {grid.n_bars} labelled bars; "
                          f"allowed {MAX_NOTES_OUTSIDE_FRACTION:.0%}")
    displacement = np.concatenate([track.displacement_s for track in placed.values()])
    notes_moved = int(np.count_nonzero(displacement > DISPLACEMENT_LIMIT_S))
    if notes_moved > MAX_MOVED_FRACTION * len(displacement):
        raise files.error("off_grid", "midi", "onsets",
                          f"{notes_moved} of {len(displacement)} onsets move more than "
                          f"{DISPLACEMENT_LIMIT_S * 1000:.0f} ms when rounded to {spec.positions_per_beat} steps per "
                          f"beat of {spec.name}; allowed {MAX_MOVED_FRACTION:.0%}")

    song = Song(song_id=files.song_id, key=key, metre=spec.name, sections=sections,
                chords=place_chords(grid, chord_starts, chord_labels),
                tracks={name: track.notes for name, track in placed.items()}, tempos=place_tempos(grid))
    song.check()
    bar_gaps = np.diff(grid.bar_rows) - spec.beats_per_bar
    stats = {
        "notes_total": notes_total,
        "notes_kept": sum(len(track.notes) for track in placed.values()),
        "notes_dropped": notes_outside,
        "notes_dropped_by_track": {name: track.outside for name, track in placed.items()},
        "notes_merged": sum(track.merged for track in placed.values()),
        "onsets_moved_over_30ms": notes_moved,
        "median_displacement_ms": float(np.median(displacement) * 1000) if len(displacement) else 0.0,
        "key_changes": key_changes,
        "aligned_fraction": round(alignment.fraction, 4),
        "grid_offset_changes": alignment.offset_changes,
        "beats_left_out": int(np.sum(np.maximum(0, bar_gaps))),
        "beats_padded": int(np.sum(np.maximum(0, -bar_gaps))),
        "bar0_beat_row": int(grid.bar_rows[0]),
        "bars": grid.n_bars,
        "beat_rows": len(beat_times),
    }
    return song, stats
