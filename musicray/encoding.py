"""Songs as token sequences: the whole song and the five sub-tasks, and the decoders back to a song.

An example is a *prompt* (header + inputs) and a *target* (one stream of the song, closed by ``<End>``).

    header  = <Task_t> <Key_k> <Metre_m> <Tempo_base> <Sec_..>+
    prompt  = header (<Input_x> body_x)*
    target  = body_t <End>

A body walks the form: ``<Sec_A8>`` opens a section, ``<Bar>`` each of its bars, then the bar's events by
position. What a bar holds depends on the stream (``musicray.streams.STREAMS``):

    song      <Bar> <Tempo|TempoChange> (<Pos> [<Chord> [<Bass>]] (<Track> (<Pitch> <Dur> <Vel>)+)*)*
    chord     <Bar> (<Pos> <Chord> [<Bass>])*          the chord sounding at the downbeat is restated there
    melody    <Bar> (<Pos> (<Pitch> <Dur>)+)*           MELODY (melody task) or BRIDGE (secondary task)
    notes     <Bar> (<Pos> (<Track> (<Pitch> <Dur>)+)+)*  all tracks without velocity (the dynamics input)
    dynamics  <Bar> <Vel>*                              one velocity per note of the bar, in note order
    tempo     <Bar> <Tempo|TempoChange>                 one tempo per bar

Tempo is encoded per bar as integer bpm, chosen so that each rebuilt downbeat lands as close as possible to
its performed time (the rounding error is carried into the next bar instead of accumulating); docs/tokens.md
gives the figures behind this choice.

The vocabulary's language (``VocabConfig``) says how chords, pitches and bar tempi are written. In the relative
language a chord is a degree of the key, a pitch counts semitones above the root of the chord sounding at its
onset (above the key's tonic where no chord sounds, or where the example has not given the chords yet: a body
read before the chord stream), and a bar's tempo is the change from the bar before (the body's first bar, and
changes beyond ``max_tempo_change``, absolute). Both languages decode to the same song.

The tables this module writes and reads by are ``musicray.streams``'s (the grammar reads them too, without the
encoder); the song ``decode(encode(song))`` reproduces is ``musicray.quantize.quantized``'s; ``musicray.windows`` cuts
songs into the section windows training examples come from.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from musicray.harmony import NO_CHORD, chord_label, key_tonic, parse_chord, reference_pitch_class
from musicray.quantize import base_tempo, canonical_chords, one_per_onset_and_pitch, quantized, representable_pitch
from musicray.song import TRACKS, Chord, Note, Song, SongError, Tempo, note_rows
from musicray.streams import (DEFAULT_BPM, NEUTRAL_VELOCITY, STREAM_FIELDS, STREAMS, TASK_FIELDS, TASK_TARGET,
                              Example, Stream, decode_header, task_inputs)
from musicray.tokens import TASKS, Vocabulary


def project(song: Song, task: str, base_bpm: float | None = None, optional: tuple[str, ...] = ()) -> Song:
    """Only the fields an example of ``task`` carries; what it does not carry takes neutral values."""
    fields = TASK_FIELDS[task] + tuple(f for name in task_inputs(task, optional) for f in STREAM_FIELDS[name])
    tracks = {}
    for name in TRACKS:
        notes = song.tracks.get(name, []) if name in fields else []
        if "velocity" not in fields:
            notes = [Note(n.bar, n.position, n.pitch, n.duration, NEUTRAL_VELOCITY) for n in notes]
        tracks[name] = notes
    if "tempo" in fields:
        tempos = list(song.tempos)
    else:
        tempos = [Tempo(0, 0, float(base_bpm if base_bpm is not None else song.tempos[0].bpm))]
    return Song(song.song_id, song.key, song.metre, list(song.sections),
                chords=list(song.chords) if "chords" in fields else [], tracks=tracks, tempos=tempos)


# -- encoding -------------------------------------------------------------------------------------------------

def encode_header(song: Song, task: str, vocab: Vocabulary, bpm: int) -> list[int]:
    ids = [vocab.token("Task", task), vocab.token("Key", song.key), vocab.token("Metre", song.metre),
           vocab.token("Tempo", bpm)]
    ids += [vocab.token("Sec", f"{s.label}{s.bars}") for s in song.sections]
    return ids


class SoundingChords:
    """The chord sounding at any (bar, position) of a list of chord changes (None before the first, or when
    the list is empty: the chords are not known)."""

    def __init__(self, chords: list[Chord]):
        self.changes = sorted(chords)
        self.times = [(c.bar, c.position) for c in self.changes]

    def at(self, bar: int, position: int) -> str | None:
        index = bisect.bisect_right(self.times, (bar, position)) - 1
        return self.changes[index].label if index >= 0 else None


def _chord_ids(label: str, vocab: Vocabulary, key: str) -> list[int]:
    root, quality, bass = parse_chord(label)
    if root is None:
        return [vocab.token("Chord", NO_CHORD)]
    ids = [vocab.chord_token(root, quality, key)]
    if bass:
        ids.append(vocab.token("Bass", bass))
    return ids


def _pitch_id(pitch: int, reference: int, vocab: Vocabulary) -> int:
    written = pitch - reference if vocab.config.pitch == "chord" else pitch
    return vocab.ids_of["Pitch"][written]


def _bar_tempo_ids(bpm_by_bar: list[int], vocab: Vocabulary) -> list[int]:
    """One tempo token per bar: absolute, or (the 'change' language) the change from the bar before."""
    limit = vocab.config.max_tempo_change
    ids = []
    for bar, bpm in enumerate(bpm_by_bar):
        change = bpm - bpm_by_bar[bar - 1] if bar else None
        if vocab.config.tempo == "change" and change is not None and abs(change) <= limit:
            ids.append(vocab.ids_of["TempoChange"][change + limit])
        else:
            ids.append(vocab.token("Tempo", bpm))
    return ids


# Where a token sorts in a body. A body lists its tokens in (time, slot) order, time counting the positions of
# every bar from bar 0 with one more before each bar's first position for the bar's own tokens: its section's
# <Sec> (on the section's first bar), <Bar>, the bar's tempo. At a position come <Pos>, the chord and its bass,
# then each track in TRACKS order: its marker, then its notes' tokens in the order the track lists them.
BAR_SLOTS = {"Sec": 0, "Bar": 1, "Tempo": 2}
POSITION_SLOTS = {"Pos": 0, "Chord": 1, "Bass": 2}
SLOTS = len(POSITION_SLOTS) + 2 * len(TRACKS)


def _marker_slot(track):
    """Slot of a track's marker (an int or an array of them); its notes come right after."""
    return len(POSITION_SLOTS) + 2 * track


def _note_slot(track):
    return len(POSITION_SLOTS) + 2 * track + 1


def _value_ids(vocab: Vocabulary, family: str, values: np.ndarray) -> np.ndarray:
    """Ids of ``<Family_value>`` for many values at once; SongError (as ``Vocabulary.token``) for one it lacks."""
    table = vocab.ids_by_value(family)
    known = (values >= 0) & (values < len(table))
    ids = np.where(known, table[np.where(known, values, 0)], -1)
    if np.any(ids < 0):
        vocab.token(family, int(values[ids < 0][0]))   # raises, naming the token
    return ids


def _distinct(ordered: np.ndarray) -> np.ndarray:
    """The distinct values of a sorted array (np.unique sorts, and hashes, again)."""
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return ordered[first]


class SongTokens:
    """A quantized song's tokens, worked out once and shared by every body and example written from it.

    A song's six task examples write twelve bodies (eight distinct ones) from the same bars, chords and notes;
    encoding each one token at a time from the song cost more CPU than reading and aligning the song. Here
    each token of the song gets its id and its sort key once, as arrays, and a body is its stream's tokens
    sorted by key (a stable sort: tokens with one key keep their order).
    """

    def __init__(self, song: Song, vocab: Vocabulary):
        self.song, self.vocab = song, vocab
        self.bpm = base_tempo(song, vocab)
        self._bodies: dict[tuple[str, bool], np.ndarray] = {}
        n_bars, tonic = song.n_bars, key_tonic(song.key)
        rows = [note_rows(song.tracks.get(name, [])) for name in TRACKS]
        bar, position, pitch, duration, velocity = np.concatenate(rows).T
        track = np.repeat(np.arange(len(TRACKS)), [len(r) for r in rows])
        if np.any((bar < 0) | (bar >= n_bars)):
            raise SongError(f"{song.song_id}: notes: a note lies outside the form's {n_bars} bars")
        latest = max(song.spec.positions_per_bar - 1, int(position.max(initial=0)),
                     max((c.position for c in song.chords), default=0))
        self.times_per_bar = latest + 2   # the bar's own tokens, then its positions

        # Chord events: the chord sounding at each downbeat restated, then the bar's changes (one per position).
        chord_events: dict[tuple[int, int], str] = {}
        chords = iter(song.chords)
        sounding, upcoming = NO_CHORD, next(chords, None)
        for bar_index in range(n_bars):
            chord_events[bar_index, 0] = sounding
            while upcoming is not None and upcoming.bar == bar_index:
                chord_events[bar_index, upcoming.position] = upcoming.label
                sounding, upcoming = upcoming.label, next(chords, None)
        chord_ids = {label: _chord_ids(label, vocab, song.key) for label in set(chord_events.values())}
        self.chord_times = np.array([self.time(b, p) for b, p in chord_events], dtype=np.int64)
        self.chord_keys = np.array([self.time(b, p) * SLOTS + POSITION_SLOTS[family]   # a chord, and its bass
                                    for (b, p), label in chord_events.items()
                                    for family in ("Chord", "Bass")[:len(chord_ids[label])]], dtype=np.int64)
        self.chord_token_ids = np.array([i for label in chord_events.values() for i in chord_ids[label]],
                                        dtype=np.int64)

        starts = song.section_starts()
        self.bar_keys = np.concatenate([
            self.time(np.array(starts, dtype=np.int64), -1) * SLOTS + BAR_SLOTS["Sec"],
            self.time(np.arange(n_bars, dtype=np.int64), -1) * SLOTS + BAR_SLOTS["Bar"]])
        self.bar_ids = np.array([vocab.token("Sec", f"{s.label}{s.bars}") for s in song.sections]
                                + [vocab.token("Bar")] * n_bars, dtype=np.int64)

        # Notes in body order (time, then track, then as listed), each with its tokens' ids.
        order = np.lexsort((track, position, bar))
        self.note_times = self.time(bar, position)[order]
        self.note_tracks = track[order]
        self.duration_ids = _value_ids(vocab, "Dur", duration[order])
        # 'track' velocities: the token's value is the velocity less its track's offset. Binned here, as the
        # vocabulary bins them: prepared data is quantized once for every language (the absolute bins), and a
        # velocity binned in its track's bins already is kept as it is.
        tracks = track[order]
        self.velocity_ids = _value_ids(vocab, "Vel", vocab.quantize_velocities(velocity[order], tracks)
                                       - vocab.velocity_offsets()[tracks])
        pitch = pitch[order]
        pitch_ids = np.asarray(vocab.ids_of["Pitch"], dtype=np.int64)
        if vocab.config.pitch == "chord":
            # Against the chord sounding at the onset (SoundingChords), or the tonic: no chord, or none known yet.
            changes = sorted(song.chords)
            change_times = np.array([self.time(c.bar, c.position) for c in changes], dtype=np.int64)
            references = np.array([reference_pitch_class(c.label, song.key) for c in changes] + [tonic],
                                  dtype=np.int64)
            sounding_change = np.searchsorted(change_times, self.note_times, side="right") - 1  # -1: the tonic
            # Pitch ids by whether the chords are known (given earlier in the example) when the body is read.
            self.pitch_ids = {True: pitch_ids[pitch - references[sounding_change]], False: pitch_ids[pitch - tonic]}
        else:
            self.pitch_ids = {True: pitch_ids[pitch], False: pitch_ids[pitch]}

    def time(self, bar, position):
        """Sort time of a (bar, position); position -1 is the bar's own tokens, before its first position."""
        return bar * self.times_per_bar + position + 1

    def body(self, stream_name: str, chords_known: bool = True) -> np.ndarray:
        """The token ids of one stream, without the closing ``<End>``. Relative pitches count from the song's
        chords when ``chords_known``, else from the key's tonic (a body read before the chords are given)."""
        stream = STREAMS[stream_name]
        writes_pitches = bool(stream.tracks) and not stream.velocities_only
        cache_key = (stream_name, chords_known and writes_pitches)
        if cache_key not in self._bodies:
            self._bodies[cache_key] = self._encode_body(stream, chords_known)
        return self._bodies[cache_key]

    def _encode_body(self, stream: Stream, chords_known: bool) -> np.ndarray:
        vocab = self.vocab
        keys, ids = [self.bar_keys], [self.bar_ids]
        if stream.tempo:
            n_bars = self.song.n_bars
            keys.append(self.time(np.arange(n_bars, dtype=np.int64), -1) * SLOTS + BAR_SLOTS["Tempo"])
            ids.append(np.asarray(_bar_tempo_ids([int(t.bpm) for t in self.song.tempos], vocab),
                                  dtype=np.int64)[np.arange(n_bars)])
        tracks = [TRACKS.index(name) for name in stream.tracks]
        selected = np.isin(self.note_tracks, tracks)
        times, track = self.note_times[selected], self.note_tracks[selected]
        note_keys = times * SLOTS + _note_slot(track)
        if stream.velocities_only:
            keys.append(note_keys)
            ids.append(self.velocity_ids[selected])
        else:
            columns = [self.pitch_ids[chords_known], self.duration_ids] + ([self.velocity_ids] if stream.velocity else [])
            keys.append(np.repeat(note_keys, len(columns)))
            ids.append(np.stack([column[selected] for column in columns], axis=1).ravel())
            event_times = [times]
            if stream.chords:
                keys.append(self.chord_keys)
                ids.append(self.chord_token_ids)
                event_times.append(self.chord_times)
            positions = _distinct(np.sort(np.concatenate(event_times)))
            keys.append(positions * SLOTS + POSITION_SLOTS["Pos"])
            ids.append(_value_ids(vocab, "Pos", positions % self.times_per_bar - 1))
            if stream.track_markers:
                marked = _distinct(times * len(TRACKS) + track)   # sorted: the notes are in body order
                marked_times, marked_tracks = np.divmod(marked, len(TRACKS))
                keys.append(marked_times * SLOTS + _marker_slot(marked_tracks))
                ids.append(np.array([vocab.token("Track", name) for name in TRACKS], dtype=np.int64)[marked_tracks])
        order = np.argsort(np.concatenate(keys), kind="stable")
        return np.concatenate(ids)[order]

    def example(self, task: str, optional: tuple[str, ...] = ()) -> Example:
        """The example of ``task``, as ``encode_quantized``."""
        if task not in TASKS:
            raise SongError(f"task: unknown task {task!r}; known: {', '.join(TASKS)}")
        vocab = self.vocab
        prompt = encode_header(self.song, task, vocab, self.bpm)
        # A body's pitches may count from the chords only once the example has given them (an earlier input, or
        # the body's own chords): the chord task's melody input is read before the chords it is for.
        chords_known = False
        for name in task_inputs(task, optional):
            chords_known = chords_known or STREAMS[name].chords
            prompt += [vocab.token("Input", name)] + self.body(name, chords_known).tolist()
        target_stream = TASK_TARGET[task]
        target = self.body(target_stream, chords_known or STREAMS[target_stream].chords).tolist()
        return Example(task, prompt, target + [vocab.token("End")], self.song.song_id)


def encode_body(song: Song, stream_name: str, vocab: Vocabulary) -> list[int]:
    """One stream of a quantized song, without the closing ``<End>``. Relative pitches count from
    ``song.chords``: pass the song without chords for a body read before the chords are known."""
    return SongTokens(song, vocab).body(stream_name).tolist()


def bar_contents(body: list[int], vocab: Vocabulary) -> list[list[int]]:
    """The tokens of each bar of a body, in order: what follows its ``<Bar>`` up to the next ``<Bar>``,
    ``<Sec_..>`` or ``<End>``."""
    bars: list[list[int]] = []
    inside = False
    for token in body:
        family = vocab.family[token]
        if family == "Bar":
            bars.append([])
            inside = True
        elif family in ("Sec", "End"):
            inside = False
        elif inside:
            bars[-1].append(token)
    return bars


def given_bars(song: Song, task: str, vocab: Vocabulary, bars: list[int],
               optional: tuple[str, ...] = ()) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """What ``task``'s stream of ``song`` holds in each of ``bars`` (0-based), as a grammar plan's forced bars
    (bar numbers from 1). A tempo change whose bar before is not given is written absolute: the bar before
    will be written anew, and the given bar must keep its own tempo whatever that one becomes."""
    example = encode(song, task, vocab, optional)
    contents = bar_contents(example.target, vocab)
    kept = set(bars)
    bpm_by_bar: list[int] = []
    for content in contents:   # each bar's absolute tempo, for the changes that must become absolute
        tempo = next((t for t in content if vocab.family[t] in ("Tempo", "TempoChange")), None)
        if tempo is not None:
            value = vocab.value[tempo]
            bpm_by_bar.append(value if vocab.family[tempo] == "Tempo" else bpm_by_bar[-1] + value)
    forced = []
    for bar in sorted(kept):
        content = list(contents[bar])
        if content and vocab.family[content[0]] == "TempoChange" and bar - 1 not in kept:
            content[0] = vocab.token("Tempo", bpm_by_bar[bar])
        forced.append((bar + 1, tuple(content)))
    return tuple(forced)


def encode(song: Song, task: str, vocab: Vocabulary, optional: tuple[str, ...] = ()) -> Example:
    """The example of ``task`` for a song (quantized here, so raw ingested songs can be passed), its prompt
    carrying the ``optional`` inputs the task accepts (``OPTIONAL_INPUTS``) as well as its own."""
    return encode_quantized(quantized(song, vocab), task, vocab, optional)


def encode_quantized(song: Song, task: str, vocab: Vocabulary, optional: tuple[str, ...] = ()) -> Example:
    """The example of ``task`` for a quantized song. To encode several tasks of one song, ask one
    ``SongTokens(song, vocab)`` for each ``example``: they share the work."""
    if task not in TASKS:
        raise SongError(f"task: unknown task {task!r}; known: {', '.join(TASKS)}")
    return SongTokens(song, vocab).example(task, optional)


def dynamics_order(song: Song, bar: int | None = None) -> list[tuple[int, str, Note]]:
    """(track index, track name, note) of the song's notes (only ``bar``'s where given) in the order the dynamics
    stream gives them velocities: by bar, position, track, pitch (``SongTokens``' body order)."""
    return [(track, name, note) for *_, track, _, name, note in sorted(
        (n.bar, n.position, TRACKS.index(name), n.pitch, name, n) for name, n in song.notes()
        if bar is None or n.bar == bar)]


def decode_body(ids: list[int], stream_name: str, song: Song, vocab: Vocabulary) -> None:
    """Add what a (grammatical) body of ``stream_name`` says to ``song`` in place.

    Relative pitches count from the chords the body carries, else from ``song.chords`` (the chords decoded so
    far: empty when the example had not given them); a tempo change on a body's first bar counts from the
    song's first tempo.
    """
    stream = STREAMS[stream_name]
    single_track = stream.tracks[0] if len(stream.tracks) == 1 else None
    tonic = key_tonic(song.key)
    known = SoundingChords([] if stream.chords else song.chords)
    bar, position, track = -1, 0, single_track
    chords, tempos = [], []
    notes: dict[str, list[Note]] = {name: [] for name in TRACKS}
    pending: dict = {}
    velocities: list[int] = []
    bpm = vocab.quantize_tempo(song.tempos[0].bpm if song.tempos else DEFAULT_BPM)
    reference = tonic
    for token in ids:
        family, value = vocab.family[token], vocab.value[token]
        if family == "Bar":
            bar, position = bar + 1, 0
            if not stream.chords:
                reference = reference_pitch_class(known.at(bar, position), song.key)
        elif family == "Tempo":
            bpm = value
            tempos.append(Tempo(bar, 0, float(bpm)))
        elif family == "TempoChange":
            bpm = min(vocab.config.tempo_max, max(vocab.config.tempo_min, bpm + value))
            tempos.append(Tempo(bar, 0, float(bpm)))
        elif family == "Pos":
            position = value
            if not stream.chords:
                reference = reference_pitch_class(known.at(bar, position), song.key)
        elif family == "NoChord":
            chords.append(Chord(bar, position, NO_CHORD))
            reference = tonic
        elif family == "Chord":
            root = vocab.chord_root(token, song.key)
            chords.append(Chord(bar, position, chord_label(root, vocab.chord_quality(token))))
            reference = root
        elif family == "Bass":
            last = chords[-1]
            chords[-1] = Chord(last.bar, last.position, f"{last.label}/{vocab.tokens[token][6:-1]}")
        elif family == "Track":
            track = TRACKS[value]
        elif family == "Pitch":
            # A generated pitch outside the range every language writes is moved by octaves into it, so that a
            # decoded song is already canonical (its notes are the ones a later stage's prompt encodes).
            pending = {"pitch": representable_pitch(reference + value if vocab.config.pitch == "chord" else value)}
        elif family == "Dur":
            pending["duration"] = value
            if not stream.velocity:
                notes[track].append(Note(bar, position, pending["pitch"], value, NEUTRAL_VELOCITY))
        elif family == "Vel":
            if stream.velocities_only:
                velocities.append(value)   # the track is the note's, known once they are matched below
            else:
                notes[track].append(Note(bar, position, pending["pitch"], pending["duration"],
                                         vocab.sounding_velocity(value, TRACKS.index(track))))
    if stream.chords:
        song.chords = canonical_chords(chords)
    if stream.tempo:
        song.tempos = tempos
    for name in stream.tracks:
        if not stream.velocities_only:
            if not stream.velocity:   # a note the song already had keeps its velocity (infilling keeps bars)
                had = {(n.bar, n.position, n.pitch, n.duration): n.velocity for n in song.tracks.get(name, [])}
                notes[name] = [dataclasses.replace(n, velocity=had.get((n.bar, n.position, n.pitch, n.duration),
                                                                       n.velocity)) for n in notes[name]]
            # Two relative pitches moved into range by octaves can meet: keep one, as the canonical song does.
            song.tracks[name] = one_per_onset_and_pitch(notes[name])
    if stream.velocities_only:
        in_order = dynamics_order(song)
        if len(in_order) != len(velocities):
            raise SongError(f"dynamics: {len(velocities)} velocities for {len(in_order)} notes")
        song.tracks = {name: [] for name in TRACKS}
        for (track_index, name, note), value in zip(in_order, velocities):
            song.tracks[name].append(Note(note.bar, note.position, note.pitch, note.duration,
                                          vocab.sounding_velocity(value, track_index)))


def decode(example: Example, vocab: Vocabulary) -> Song:
    """The song an example describes: header, inputs and target (which must be grammatical)."""
    header = decode_header(example.prompt, vocab)
    song = Song(example.song_id, header.key, header.metre, header.sections, chords=[],
                tracks={name: [] for name in TRACKS}, tempos=[Tempo(0, 0, float(header.bpm))])
    for name, ids in header.inputs.items():
        decode_body(ids, name, song, vocab)
    target = example.target[:-1] if example.target and vocab.family[example.target[-1]] == "End" else example.target
    decode_body(target, TASK_TARGET[header.task], song, vocab)
    return song


def round_trip_song(song: Song, task: str, vocab: Vocabulary, optional: tuple[str, ...] = ()) -> tuple[Song, Song]:
    """(expected, decoded) for ``task``: the two are equal when encoding is lossless up to quantization."""
    expected = quantized(song, vocab)
    example = encode(song, task, vocab, optional)
    return project(expected, task, base_tempo(expected, vocab), optional), decode(example, vocab)
