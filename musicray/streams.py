"""The token layout of musicray's examples, as tables: which streams exist and what each carries in a bar, which
stream each task writes and which it reads, the fields they carry, and the prompt's header.

An example is a *prompt* (header + inputs) and a *target* (one stream of the song, closed by ``<End>``)::

    header  = <Task_t> <Key_k> <Metre_m> <Tempo_base> <Sec_..>+
    prompt  = header (<Input_x> body_x)*
    target  = body_t <End>

``musicray.encoding`` writes and reads the bodies by these tables, and the grammar (``musicray.grammar``) checks
them by the same tables, without the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from musicray.harmony import CHORD_QUALITIES
from musicray.song import TRACKS, Section, Song, SongError
from musicray.tokens import TASKS, Vocabulary


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
