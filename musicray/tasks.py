"""The sub-tasks as data: one frozen ``SubTask`` record per stage of a song (chord, melody, secondary, dynamics,
tempo), read by the composer, the engines, the evaluation and the server instead of ``if task == ...`` branches.

A record says what the stage writes (its target stream), what its prompt reads (inputs and optional inputs, the
encoding's tables), how many tokens per bar it may spend beyond the form's minimum, which bars are forced (the
tempo stage starts at the request's tempo, and a tempo direction gives its last section's bars), what it prepares
in the song before it runs (dynamics voice the PIANO part, which they perform too), what it redoes after
infilling (rewritten chords re-voice the PIANO of those bars), which of a form's returning bars it copies from
their first occurrence (``Request.variation``), which request field gives its part instead (then the stage does not
run), its LoRA adapter, what a streamed bar event carries, and the name of its Serve stage method. Adding a
sub-task is a new row here (plus its stream in ``musicray.streams`` and its token in ``musicray.tokens``).

Low in the import graph on purpose: it reads the encoding, tokens and songs, and nothing that runs a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from musicray.accompaniment import revoice_bars, voice_piano
from musicray.encoding import bar_contents
from musicray.quantize import base_tempo, quantized
from musicray.song import Song, Tempo
from musicray.streams import OPTIONAL_INPUTS, STREAMS, TASK_INPUTS, TASK_TARGET, decode_header
from musicray.tempo_direction import directed_tempi
from musicray.tokens import SUBTASKS, Vocabulary


def voice_and_quantize(song: Song, vocab: Vocabulary) -> None:
    """Before dynamics: voice the PIANO part if the song has none (dynamics perform it too), and give the notes
    the canonical form the prompt writes (one per onset and pitch, inside the form)."""
    if not song.tracks["PIANO"] and song.chords:
        song.tracks["PIANO"] = voice_piano(song)
    song.tracks = quantized(song, vocab).tracks


Forced = tuple[tuple[int, tuple[int, ...]], ...]   # (bar from 1, its tokens after <Bar>), as ``Plan.forced``


def requested_tempo_bars(song: Song, vocab: Vocabulary, tempo_direction: str) -> Forced:
    """The tempo stage's given bars: the requested tempo is where the song starts, and the model writes how it
    moves on from there, but for the last section's bars under a tempo direction (``directed_tempi`` from the
    same tempo), each an absolute tempo."""
    tempo = base_tempo(song, vocab)
    bars = {1: tempo, **{bar + 1: vocab.quantize_tempo(bpm)
                         for bar, bpm in directed_tempi(song.sections, tempo, tempo_direction)}}
    return tuple((bar, (vocab.token("Tempo", bpm),)) for bar, bpm in sorted(bars.items()))


Copies = list[tuple[int, int]]


def every_return(copies: Copies, prompt: list[int], vocab: Vocabulary) -> Copies:
    """A returning bar repeats its first occurrence's tokens (chords, a melody)."""
    return copies


def returns_with_the_same_notes(copies: Copies, prompt: list[int], vocab: Vocabulary) -> Copies:
    """Velocities go by note order: a returning bar repeats its first occurrence's velocities where the prompt's
    notes have the same onsets and pitches there (durations aside: the accompaniment's last chord lasts into
    whatever follows the bar)."""
    notes = [[t for t in content if vocab.family[t] != "Dur"] for content in
             bar_contents(decode_header(prompt, vocab).inputs.get("notes", []), vocab)]
    return [(bar, source) for bar, source in copies if notes[bar - 1] == notes[source - 1]]


@dataclass(frozen=True)
class SubTask:
    """One stage of a song (see the module docstring)."""

    name: str
    tokens_per_bar: int
    """Tokens the stage may emit per bar beyond the form's minimum: caps runaway generations while leaving room
    for dense bars (0: the form and the notes fix the stream's length)."""
    bar_event: str
    """The key of a streamed bar event's payload: ``chords``, ``notes``, ``velocities`` or ``bpm``."""
    given_by: str | None = None
    """The ``Request`` field that gives this stage's part instead (the stage then does not run), if any."""
    forced_bars: Callable[[Song, Vocabulary, str], Forced] | None = None
    """The bars fixed before the stage runs (outside infilling), given the request's tempo direction, if any."""
    prepare: Callable[[Song, Vocabulary], None] | None = None
    """What the stage needs in the song before its prompt is built, if anything."""
    after_infilling: Callable[[Song, tuple[int, ...]], None] | None = None
    """What follows the stage when it rewrote ``bars`` (0-based) of a given song, if anything."""
    returns: Callable[[Copies, list[int], Vocabulary], Copies] | None = None
    """Which of the request's returning bars (bar, first occurrence's bar; from 1) the stage copies, given its
    prompt (``Request.variation``); None: it writes every bar anew."""

    @property
    def target(self) -> str:
        """The stream the stage writes."""
        return TASK_TARGET[self.name]

    @property
    def inputs(self) -> tuple[str, ...]:
        """The streams its prompt always carries (the earlier stages' outputs)."""
        return TASK_INPUTS[self.name]

    @property
    def optional_inputs(self) -> tuple[str, ...]:
        """Streams its prompt carries when the song has them (e.g. a given melody for the chord task)."""
        return OPTIONAL_INPUTS.get(self.name, ())

    @property
    def track(self) -> str | None:
        """The one track a melodic stage writes (MELODY, BRIDGE), else None."""
        tracks = STREAMS[self.target].tracks
        return tracks[0] if len(tracks) == 1 else None

    @property
    def adapter(self) -> str:
        """The name of its LoRA adapter (``adapters/<name>/`` in a run dir, the PEFT and vLLM adapter name)."""
        return self.name

    @property
    def serve_method(self) -> str:
        """The stage deployments' method that runs this stage alone (the per-adapter layout)."""
        return self.name


SUBTASK_RECORDS: dict[str, SubTask] = {task.name: task for task in (
    SubTask("chord", tokens_per_bar=24, bar_event="chords", given_by="chords", after_infilling=revoice_bars,
            returns=every_return),
    SubTask("melody", tokens_per_bar=96, bar_event="notes", given_by="melody", returns=every_return),
    SubTask("secondary", tokens_per_bar=96, bar_event="notes", given_by="bridge", returns=every_return),
    SubTask("dynamics", tokens_per_bar=0, bar_event="velocities", prepare=voice_and_quantize,
            returns=returns_with_the_same_notes),
    SubTask("tempo", tokens_per_bar=0, bar_event="bpm", forced_bars=requested_tempo_bars),
)}
assert tuple(SUBTASK_RECORDS) == SUBTASKS, "one record per sub-task, in stage order"


def subtask(name: str) -> SubTask:
    """The record of sub-task ``name``."""
    return SUBTASK_RECORDS[name]


def keep_given(song: Song, given: Song, task: str, bars: tuple[int, ...],
               tracks: tuple[str, ...] | None = None) -> None:
    """After ``task`` rewrote ``bars`` (0-based) of ``tracks`` (None: every track) of a ``given`` song, put back
    what the stage writes everywhere else exactly as given: its notes and its tempo map. The stage kept those
    bars token for token, but tokens are the canonical song (velocities and tempi in the vocabulary's bins, one
    note per onset and pitch, pitches in the written range), and a musician's own bars stay as they wrote them.
    Chords are kept by the tokens already (each bar restates the chord sounding at its downbeat); a track the
    given song has no notes in is musicray's own (the PIANO voiced from the chords) and stays as the stage left
    it."""
    stream = STREAMS[subtask(task).target]
    span = set(bars)
    for name in (name for name in stream.tracks if given.tracks[name]):
        rewritten = span if tracks is None or name in tracks else set()
        song.tracks[name] = sorted([n for n in song.tracks[name] if n.bar in rewritten] +
                                   [n for n in given.tracks[name] if n.bar not in rewritten])
    if stream.tempo and given.tempos:
        kept = [bar for bar in range(song.n_bars) if bar not in span]
        given_tempos = sorted(given.tempos)
        restated = []   # a kept bar after a rewritten one starts at the tempo the given song has there
        for bar in kept:
            if (bar > 0 and bar - 1 not in span) or any(t.bar == bar and t.position == 0 for t in given_tempos):
                continue
            before = [t for t in given_tempos if (t.bar, t.position) <= (bar, 0)]
            restated.append(Tempo(bar, 0, (before[-1] if before else given_tempos[0]).bpm))
        song.tempos = sorted([t for t in song.tempos if t.bar in span] + restated +
                             [t for t in given_tempos if t.bar not in span])


def stages_rewriting(tracks: tuple[str, ...], stages: tuple[str, ...] = SUBTASKS) -> list[str]:
    """Of ``stages``, in stage order, those whose stream writes any of ``tracks`` (infilling by track: the melodic
    stage of each and dynamics, which performs every track; not chords, not tempo)."""
    return [name for name in SUBTASKS if name in stages and set(STREAMS[subtask(name).target].tracks) & set(tracks)]
