"""Songs as token sequences: the whole song and the five sub-tasks, and the decoders back to a song.

An example is a *prompt* (header + inputs) and a *target* (one stream of the song, closed by ``<End>``).

    header  = <Task_t> <Key_k> <Metre_m> <Tempo_base> <Sec_..>+
    prompt  = header (<Input_x> body_x)*
    target  = body_t <End>

A body walks the form: ``<Sec_A8>`` opens a section, ``<Bar>`` each of its bars, then the bar's events by
position. What a bar holds depends on the stream (``STREAMS``):

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
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
from dataclasses import dataclass, field

from musicray.harmony import (CHORD_QUALITIES, NO_CHORD, canonical_key, chord_label, key_tonic, parse_chord,
                              reference_pitch_class)
from musicray.song import TRACKS, Chord, Note, Section, Song, SongError, Tempo
from musicray.tokens import REPRESENTABLE_PITCHES, TASKS, Vocabulary


@dataclass(frozen=True)
class Stream:
    """What one body carries in each bar."""

    tempo: bool = False
    chords: bool = False
    tracks: tuple[str, ...] = ()
    track_markers: bool = False
    velocity: bool = False
    velocities_only: bool = False


STREAMS: dict[str, Stream] = {
    "song": Stream(tempo=True, chords=True, tracks=TRACKS, track_markers=True, velocity=True),
    "chord": Stream(chords=True),
    "melody": Stream(tracks=("MELODY",)),
    "secondary": Stream(tracks=("BRIDGE",)),
    "notes": Stream(tracks=TRACKS, track_markers=True),
    "dynamics": Stream(tracks=TRACKS, velocities_only=True),
    "tempo": Stream(tempo=True),
}

# The stream each task generates, and the streams its prompt gives as input (the earlier stages' outputs).
TASK_TARGET: dict[str, str] = {t: t for t in TASKS}
TASK_INPUTS: dict[str, tuple[str, ...]] = {
    "song": (),
    "chord": (),
    "melody": ("chord",),
    "secondary": ("chord", "melody"),
    "dynamics": ("notes",),
    "tempo": ("melody",),
}
# Inputs a task's prompt may carry besides its own: chords written *for* a given melody (a user's own tune)
# see it; trained both ways, the chord adapter serves with and without one.
OPTIONAL_INPUTS: dict[str, tuple[str, ...]] = {"chord": ("melody",)}
# The song fields each stream carries, and those an example of each task carries (prompt and target together).
STREAM_FIELDS: dict[str, tuple[str, ...]] = {
    "chord": ("chords",), "melody": ("MELODY",), "secondary": ("BRIDGE",),
    "notes": ("MELODY", "BRIDGE", "PIANO"), "tempo": ("tempo",),
}
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "song": ("chords", "MELODY", "BRIDGE", "PIANO", "velocity", "tempo"),
    "chord": ("chords",),
    "melody": ("chords", "MELODY"),
    "secondary": ("chords", "MELODY", "BRIDGE"),
    "dynamics": ("MELODY", "BRIDGE", "PIANO", "velocity"),
    "tempo": ("MELODY", "tempo"),
}

CHORD_QUALITY_NAMES: tuple[str, ...] = tuple(CHORD_QUALITIES)
# Version of the canonical song (``quantized``) that prepared data stores: 2 keeps every note inside the form
# and its pitch in the range every language writes. Prepared data of another version is prepared again.
CANONICAL_FORMAT = 2
# Notes of a stream without velocity decode with this one; it is a bin centre so quantization keeps it.
NEUTRAL_VELOCITY = 82
DEFAULT_BPM = 120.0


@dataclass
class Example:
    task: str
    prompt: list[int]
    target: list[int]
    song_id: str = ""
    meta: dict = field(default_factory=dict)


# -- canonical (quantized) songs ------------------------------------------------------------------------------

def bar_tempos(song: Song) -> list[float]:
    """Each bar's mean tempo: beats per bar over the bar's duration, with the tempo sounding at each beat."""
    spec = song.spec
    tempos = sorted(song.tempos)
    result, index, current = [], 0, (tempos[0].bpm if tempos else DEFAULT_BPM)
    for bar in range(song.n_bars):
        seconds = 0.0
        for beat in range(spec.beats_per_bar):
            here = (bar, beat * spec.positions_per_beat)
            while index < len(tempos) and (tempos[index].bar, tempos[index].position) <= here:
                current = tempos[index].bpm
                index += 1
            seconds += 60.0 / current
        result.append(spec.beats_per_bar * 60.0 / seconds)
    return result


def base_tempo(song: Song, vocab: Vocabulary) -> int:
    """The header's tempo: the median bar tempo, robust to a rubato intro and a final ritardando."""
    return vocab.quantize_tempo(statistics.median(bar_tempos(song)))


def canonical_chords(chords: list[Chord]) -> list[Chord]:
    """Sorted, canonical labels, the last of simultaneous changes kept, repeats merged, a chord at the start."""
    by_time: dict[tuple[int, int], str] = {}
    for chord in sorted(chords):
        by_time[(chord.bar, chord.position)] = chord_label(*parse_chord(chord.label))
    if (0, 0) not in by_time:
        by_time[(0, 0)] = NO_CHORD
    merged: list[Chord] = []
    for (bar, position), label in sorted(by_time.items()):
        if not merged or merged[-1].label != label:
            merged.append(Chord(bar, position, label))
    return merged


def representable_pitch(pitch: int) -> int:
    """The pitch moved by octaves into the range every language can write (MIDI 11..116)."""
    low, high = REPRESENTABLE_PITCHES
    while pitch < low:
        pitch += 12
    while pitch > high:
        pitch -= 12
    return pitch


def canonical_notes(song: Song, track: str, vocab: Vocabulary) -> list[Note]:
    """A track's notes binned (velocity), moved into the representable pitch range, clipped (duration: to the
    vocabulary's longest and to the form's end), one note per (onset, pitch): the longest, then the loudest."""
    notes = [song.inside_form(note) for note in song.tracks.get(track, [])]
    return one_per_onset_and_pitch([Note(n.bar, n.position, representable_pitch(n.pitch),
                                         vocab.quantize_duration(n.duration), vocab.quantize_velocity(n.velocity))
                                    for n in notes])


def one_per_onset_and_pitch(notes: list[Note]) -> list[Note]:
    """The notes, sorted, with one note per (onset, pitch): the longest, then the loudest (MIDI cannot hold two)."""
    best: dict[tuple[int, int, int], Note] = {}
    for note in notes:
        key = (note.bar, note.position, note.pitch)
        if key not in best or (note.duration, note.velocity) > (best[key].duration, best[key].velocity):
            best[key] = note
    return sorted(best.values())


def quantized(song: Song, vocab: Vocabulary) -> Song:
    """The song as the vocabulary can express it; ``decode(encode(song)) == project(quantized(song), task)``."""
    return Song(
        song_id=song.song_id,
        key=canonical_key(song.key),
        metre=song.metre,
        sections=list(song.sections),
        chords=canonical_chords(song.chords),
        tracks={name: canonical_notes(song, name, vocab) for name in TRACKS},
        tempos=[Tempo(bar, 0, float(bpm)) for bar, bpm in enumerate(bar_tempo_tokens(song, vocab))],
    )


def bar_tempo_tokens(song: Song, vocab: Vocabulary) -> list[int]:
    """Integer bpm per bar whose rebuilt downbeats track the performed ones: each bar's value is rounded from
    the tempo that would reach the *performed* end of the bar from where the rebuilt bars have got to."""
    beats = song.spec.beats_per_bar
    performed = rebuilt = 0.0
    tokens = []
    for bpm in bar_tempos(song):
        performed += beats * 60.0 / bpm
        remaining = performed - rebuilt
        token = vocab.quantize_tempo(beats * 60.0 / remaining) if remaining > 0 else vocab.config.tempo_max
        tokens.append(token)
        rebuilt += beats * 60.0 / token
    return tokens


def task_inputs(task: str, optional: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The input streams of a ``task`` prompt: its own, then the ``optional`` ones it accepts, in stage order."""
    unknown = set(optional) - set(OPTIONAL_INPUTS.get(task, ()))
    if unknown:
        raise SongError(f"inputs: task {task!r} takes no {sorted(unknown)} input "
                        f"(optional inputs: {list(OPTIONAL_INPUTS.get(task, ())) or 'none'})")
    return TASK_INPUTS[task] + tuple(name for name in OPTIONAL_INPUTS.get(task, ()) if name in optional)


def available_inputs(song: Song, task: str) -> tuple[str, ...]:
    """The optional inputs of ``task`` the song has something for (a melody-less window gives no melody)."""
    present = {"chords": bool(song.chords), "tempo": bool(song.tempos),
               **{name: bool(song.tracks.get(name)) for name in TRACKS}}
    return tuple(name for name in OPTIONAL_INPUTS.get(task, ()) if any(present[f] for f in STREAM_FIELDS[name]))


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


def _chord_ids(label: str, vocab: Vocabulary, tonic: int) -> list[int]:
    root, quality, bass = parse_chord(label)
    if root is None:
        return [vocab.token("Chord", NO_CHORD)]
    written = (root - tonic) % 12 if vocab.config.chords == "degree" else root
    ids = [vocab.ids_of["Chord"][written * len(CHORD_QUALITY_NAMES) + CHORD_QUALITY_NAMES.index(quality)]]
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


def _bar_events(song: Song, stream: Stream) -> list[dict[int, dict]]:
    """Per bar: position -> {"chord": label, "notes": {track: [notes]}}, with the downbeat chord restated."""
    bars: list[dict[int, dict]] = [dict() for _ in range(song.n_bars)]

    def at(bar: int, position: int) -> dict:
        return bars[bar].setdefault(position, {"chord": None, "notes": {}})

    if stream.chords:
        chords = iter(song.chords)
        sounding, upcoming = NO_CHORD, next(chords, None)
        for bar in range(song.n_bars):
            at(bar, 0)["chord"] = sounding
            while upcoming is not None and upcoming.bar == bar:
                at(bar, upcoming.position)["chord"] = upcoming.label
                sounding, upcoming = upcoming.label, next(chords, None)
    for name in stream.tracks:
        for note in song.tracks[name]:
            at(note.bar, note.position)["notes"].setdefault(name, []).append(note)
    return bars


def encode_body(song: Song, stream_name: str, vocab: Vocabulary) -> list[int]:
    """One stream of a quantized song, without the closing ``<End>``. Relative pitches count from
    ``song.chords``: pass the song without chords for a body read before the chords are known."""
    stream = STREAMS[stream_name]
    bar_events = _bar_events(song, stream)
    tempo_ids = _bar_tempo_ids([int(t.bpm) for t in song.tempos], vocab) if stream.tempo else []
    tonic = key_tonic(song.key)
    sounding = SoundingChords(song.chords)
    ids: list[int] = []
    bar = 0
    for section in song.sections:
        ids.append(vocab.token("Sec", f"{section.label}{section.bars}"))
        for _ in range(section.bars):
            ids.append(vocab.token("Bar"))
            if stream.tempo:
                ids.append(tempo_ids[bar])
            for position, events in sorted(bar_events[bar].items()):
                if stream.velocities_only:
                    for name in TRACKS:
                        ids += [vocab.token("Vel", n.velocity) for n in events["notes"].get(name, [])]
                    continue
                ids.append(vocab.token("Pos", position))
                if events["chord"] is not None:
                    ids += _chord_ids(events["chord"], vocab, tonic)
                reference = reference_pitch_class(sounding.at(bar, position), song.key)
                for name in TRACKS:
                    notes = events["notes"].get(name)
                    if not notes:
                        continue
                    if stream.track_markers:
                        ids.append(vocab.token("Track", name))
                    for note in notes:
                        ids += [_pitch_id(note.pitch, reference, vocab), vocab.token("Dur", note.duration)]
                        if stream.velocity:
                            ids.append(vocab.token("Vel", note.velocity))
            bar += 1
    return ids


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
    if task not in TASKS:
        raise SongError(f"task: unknown task {task!r}; known: {', '.join(TASKS)}")
    bpm = base_tempo(song, vocab)
    prompt = encode_header(song, task, vocab, bpm)
    # A body's pitches may count from the chords only once the example has given them (an earlier input, or
    # the body's own chords): the chord task's melody input is read before the chords it is for.
    known = song.replace(chords=[])
    for name in task_inputs(task, optional):
        if STREAMS[name].chords:
            known = song
        prompt += [vocab.token("Input", name)] + encode_body(known, name, vocab)
    target_stream = TASK_TARGET[task]
    target = encode_body(song if STREAMS[target_stream].chords else known, target_stream, vocab) + [vocab.token("End")]
    return Example(task, prompt, target, song.song_id)


# -- decoding -------------------------------------------------------------------------------------------------

@dataclass
class Header:
    task: str
    key: str
    metre: str
    bpm: int
    sections: list[Section]
    inputs: dict[str, list[int]]


def decode_header(prompt: list[int], vocab: Vocabulary) -> Header:
    families = [vocab.family[i] for i in prompt[:4]]
    if families != ["Task", "Key", "Metre", "Tempo"]:
        raise SongError(f"prompt: expected <Task_..><Key_..><Metre_..><Tempo_..> first, got "
                        f"{vocab.describe(prompt[:4])}")
    text = [vocab.tokens[i][1:-1].split("_", 1)[1] for i in prompt[:4]]
    sections, i = [], 4
    while i < len(prompt) and vocab.family[prompt[i]] == "Sec":
        label = vocab.tokens[prompt[i]][5:-1]
        sections.append(Section(label[0], int(label[1:])))
        i += 1
    if not sections:
        raise SongError("prompt: the header names no section")
    inputs: dict[str, list[int]] = {}
    current = None
    for token in prompt[i:]:
        if vocab.family[token] == "Input":
            current = vocab.tokens[token][7:-1]
            inputs[current] = []
        elif current is None:
            raise SongError(f"prompt: unexpected {vocab.tokens[token]} after the header")
        else:
            inputs[current].append(token)
    return Header(text[0], text[1], text[2], int(text[3]), sections, inputs)


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
            root = (tonic + value) % 12 if vocab.config.chords == "degree" else value
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
                velocities.append(value)
            else:
                notes[track].append(Note(bar, position, pending["pitch"], pending["duration"], value))
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
        in_order = sorted((n.bar, n.position, TRACKS.index(name), n.pitch, name, n) for name, n in song.notes())
        if len(in_order) != len(velocities):
            raise SongError(f"dynamics: {len(velocities)} velocities for {len(in_order)} notes")
        song.tracks = {name: [] for name in TRACKS}
        for (*_, name, note), velocity in zip(in_order, velocities):
            song.tracks[name].append(Note(note.bar, note.position, note.pitch, note.duration, velocity))


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


def section_windows(song: Song, max_bars: int | None) -> list[Song]:
    """The song cut at section boundaries into windows of at most ``max_bars`` bars (a longer section is a
    window of its own), each renumbered from bar 0 with the chord and tempo sounding at its start.

    Windows keep every grammar invariant (whole sections, exact bar counts), so long songs can train a model
    with a short context.
    """
    if not max_bars or song.n_bars <= max_bars:
        return [song]
    groups: list[list[int]] = [[]]
    bars_in_group = 0
    for index, section in enumerate(song.sections):
        if groups[-1] and bars_in_group + section.bars > max_bars:
            groups.append([])
            bars_in_group = 0
        groups[-1].append(index)
        bars_in_group += section.bars
    starts = song.section_starts() + [song.n_bars]
    windows = []
    for n, group in enumerate(groups):
        first, last = starts[group[0]], starts[group[-1] + 1]

        def inside(item) -> bool:
            return first <= item.bar < last

        def shift(item):
            return dataclasses.replace(item, bar=item.bar - first)

        sounding = [c for c in song.chords if (c.bar, c.position) <= (first, 0)]
        chords = ([Chord(0, 0, sounding[-1].label)] if sounding else []) + \
            [shift(c) for c in song.chords if inside(c) and (c.bar, c.position) != (first, 0)]
        tempo_before = [t for t in song.tempos if (t.bar, t.position) <= (first, 0)]
        tempos = ([Tempo(0, 0, tempo_before[-1].bpm)] if tempo_before else []) + \
            [shift(t) for t in song.tempos if inside(t) and (t.bar, t.position) != (first, 0)]
        window = Song(
            f"{song.song_id}#{n}", song.key, song.metre, [song.sections[i] for i in group], chords=chords,
            tracks={name: [shift(x) for x in notes if inside(x)] for name, notes in song.tracks.items()},
            tempos=tempos)
        window.tracks = {name: [window.inside_form(x) for x in notes] for name, notes in window.tracks.items()}
        windows.append(window)
    return windows
