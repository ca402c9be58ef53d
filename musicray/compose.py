"""The composer: chords -> melody -> secondary melody -> dynamics -> tempo, each stage with its sub-task's
LoRA adapter on the shared stage-1 model, each conditioned on the stages before it.

Given chords skip the chord stage, a given secondary melody the secondary stage; a given melody skips the melody
stage and the chord stage writes chords for it (the chord task's optional melody input); ``stages`` runs a subset
(e.g. only dynamics and tempo to perform a song whose notes are given). PIANO is the chords voiced into a simple accompaniment (bass + close triad per change).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musicray.decode import generate
from musicray.encoding import (
    TASK_TARGET, available_inputs, base_tempo, decode_body, encode, given_bars, quantized, task_inputs,
)
from musicray.grammar import Grammar, Plan
from musicray.harmony import canonical_chord, canonical_key, chord_bass_pitch_class, chord_pitch_classes
from musicray.harmony_guard import guard_plan
from musicray.model import MusicTokenizer, load_music_model
from musicray.run import RunDir
from musicray.sampling import Sampling
from musicray.song import TRACKS, Chord, Note, Song, SongError, Tempo, metre, parse_form
from musicray.tokens import SUBTASKS

# Tokens a stage may emit per bar at most (beyond the form's minimum): caps runaway generations while leaving
# room for dense bars. Dynamics and tempo are fully determined by the form and the notes.
TOKENS_PER_BAR: dict[str, int] = {"chord": 24, "melody": 96, "secondary": 96, "dynamics": 0, "tempo": 0}
NEUTRAL_VELOCITY = 82


@dataclass
class Request:
    form: str
    key: str = "C:maj"
    metre: str = "4/4"
    tempo: int = 100
    seed: int = 0
    chords: list[Chord] | None = None
    melody: list[Note] | None = None
    stages: tuple[str, ...] = SUBTASKS
    sampling: Sampling = field(default_factory=Sampling)
    use_mask: bool = True
    bridge: list[Note] | None = None  # a given secondary melody (BRIDGE) replaces the secondary stage
    piano: list[Note] | None = None   # a given accompaniment is performed as it is instead of the voiced chords
    # Infilling: the bars (0-based) that ``stages`` write anew; every other bar of those stages keeps what the
    # request gives (chords, melody, bridge, piano, tempo), token for token. None: compose as usual.
    regenerate: tuple[int, ...] | None = None
    tempos: list[Tempo] | None = None  # a given tempo map (kept outside the regenerated bars)
    # Sampling settings of single stages instead of ``sampling`` (e.g. a cooler melody over livelier dynamics).
    stage_sampling: dict[str, Sampling] | None = None
    # The harmony guard (musicray.harmony_guard): chords among POP909's 99 % in the key's mode, MELODY and BRIDGE
    # pitches in the key's scale or the sounding chord and in their POP909 register. Applied by the mask only.
    harmony_guard: bool = True

    def sampling_for(self, stage: str) -> Sampling:
        """How ``stage``'s tokens are drawn: its own settings where ``stage_sampling`` has them, else ``sampling``."""
        return (self.stage_sampling or {}).get(stage, self.sampling)

    def song(self) -> Song:
        """The song the request describes, empty but for what it gives (validated: form, key, metre, tempo)."""
        sections = parse_form(self.form)
        spec = metre(self.metre)
        if not 20 <= float(self.tempo) <= 300:
            raise SongError(f"tempo: {self.tempo} bpm is outside 20..300")
        try:
            key = canonical_key(self.key)
        except SongError as err:
            raise SongError(f"key: {err}") from None
        song = Song("generated", key, spec.name, sections, chords=list(self.chords or []),
                    tracks={name: [] for name in TRACKS},
                    tempos=[t for t in self.tempos if t.bar < sum(s.bars for s in sections)] if self.tempos
                    else [Tempo(0, 0, float(self.tempo))])
        for name, notes in (("MELODY", self.melody), ("BRIDGE", self.bridge), ("PIANO", self.piano)):
            if notes:
                song.tracks[name] = [song.inside_form(n) for n in sorted(notes) if n.bar < song.n_bars]
        for field_name, names in (("stages", self.stages), ("stage_sampling", self.stage_sampling or {})):
            unknown = set(names) - set(SUBTASKS)
            if unknown:
                raise SongError(f"{field_name}: unknown {sorted(unknown)}; known: {', '.join(SUBTASKS)}")
        if self.regenerate is not None:
            outside = sorted(b for b in self.regenerate if not 0 <= b < song.n_bars)
            if outside or not self.regenerate:
                raise SongError(f"regenerate: bars {[b + 1 for b in outside] or '(none)'} are not bars of the form "
                                f"{song.form} (1..{song.n_bars})")
        song.check()
        return song


def parse_chords(text: str, form: str, metre_name: str) -> list[Chord]:
    """Chords from text: one entry per bar, cycled over the form's bars; ``C:maj,G:maj`` splits a bar evenly."""
    bars = sum(s.bars for s in parse_form(form))
    spec = metre(metre_name)
    entries = text.split()
    if not entries:
        raise SongError("chords: no chord given")
    chords = []
    for bar in range(bars):
        labels = entries[bar % len(entries)].split(",")
        for k, label in enumerate(labels):
            position = (k * spec.beats_per_bar // len(labels)) * spec.positions_per_beat
            try:
                chords.append(Chord(bar, position, canonical_chord(label)))
            except SongError as err:
                raise SongError(f"chords: bar {bar + 1}: {err}") from None
    return chords


def regenerated_bars(form: str, labels: str | None = None, bars: str | None = None) -> tuple[int, ...]:
    """The bars (0-based) to write anew: every bar of the sections whose label is in ``labels`` (e.g. ``B`` or
    ``A,B``) and the 1-based inclusive ranges of ``bars`` (e.g. ``9-16`` or ``1-4,9``)."""
    sections = parse_form(form)
    chosen: set[int] = set()
    if labels:
        wanted = {label.strip() for label in labels.split(",") if label.strip()}
        missing = wanted - {s.label for s in sections}
        if missing:
            raise SongError(f"regenerate: the form {form} has no section labelled {', '.join(sorted(missing))}")
        start = 0
        for section in sections:
            if section.label in wanted:
                chosen.update(range(start, start + section.bars))
            start += section.bars
    if bars:
        n_bars = sum(s.bars for s in sections)
        for part in bars.split(","):
            first, _, last = part.strip().partition("-")
            try:
                low, high = int(first), int(last or first)
            except ValueError:
                raise SongError(f"regenerate-bars: cannot read {part!r}; expected e.g. 9-16 or 1-4,9") from None
            if not 1 <= low <= high <= n_bars:
                raise SongError(f"regenerate-bars: {part.strip()} is not a range of bars in 1..{n_bars}")
            chosen.update(range(low - 1, high))
    if not chosen:
        raise SongError("regenerate: no bar chosen (give section labels or bar ranges)")
    return tuple(sorted(chosen))


def voice_piano(song: Song, velocity: int = NEUTRAL_VELOCITY) -> list[Note]:
    """A simple accompaniment: at every chord change, the bass note (octave 2-3) and a close triad above C4."""
    spec = song.spec
    changes = sorted(song.chords)
    notes = []
    for i, chord in enumerate(changes):
        tones = chord_pitch_classes(chord.label)
        if not tones:
            continue
        start = chord.bar * spec.positions_per_bar + chord.position
        end = (changes[i + 1].bar * spec.positions_per_bar + changes[i + 1].position) if i + 1 < len(changes) \
            else song.n_bars * spec.positions_per_bar
        duration = max(1, min(end - start, 64))
        bass = 36 + chord_bass_pitch_class(chord.label)
        upper = sorted({60 + (pc - 60) % 12 for pc in tones})
        for pitch in [bass, *upper]:
            notes.append(Note(chord.bar, chord.position, pitch, duration, velocity))
    return sorted(set(notes))


@dataclass
class StageInput:
    """What one song's stage decodes from: its prompt (LLM ids), grammar plan, token budget and seed."""

    task: str
    stream: str
    optional: tuple[str, ...]   # the task's optional inputs the song gives (e.g. a melody for the chord task)
    plan: Plan
    budget: int
    prompt: list[int]
    seed: int


class StagePlanner:
    """The model-free half of a stage: prompt, plan and budget before decoding, and after it the check of the
    answer and its writing into the song. Every engine shares it (``Composer``: musicray's own loop; the vLLM
    engine of ``musicray.serve``), so they compose from the same prompts under the same grammar."""

    def __init__(self, music: MusicTokenizer, grammar: Grammar, adapters: list[str],
                 tokens_per_bar: dict[str, int] | None = None):
        self.music, self.grammar, self.adapters = music, grammar, list(adapters)
        self.tokens_per_bar = {**TOKENS_PER_BAR, **(tokens_per_bar or {})}

    def stage_inputs(self, songs: list[Song], task: str, requests: list[Request]) -> list[StageInput]:
        vocab = self.music.vocab
        stream = TASK_TARGET[task]
        optional = [available_inputs(song, task) for song in songs]
        examples = [encode(song, task, vocab, given) for song, given in zip(songs, optional)]
        plans = [self._guarded(self._plan(example, song, task, request, given), song, stream, request)
                 for example, song, request, given in zip(examples, songs, requests, optional)]
        minimum = self.grammar.tokens_to_finish(self.grammar.start([stream] * len(plans), plans)).tolist()
        return [StageInput(task, stream, given, plan, m + self.tokens_per_bar[task] * (plan.n_bars - len(plan.forced)),
                           self.music.prompt_ids(example), request.seed * 1009 + SUBTASKS.index(task))
                for example, given, plan, m, request in zip(examples, optional, plans, minimum, requests)]

    def write_stage(self, song: Song, stage: StageInput, tokens: list[int], use_mask: bool, report: dict) -> dict:
        """Check a stage's answer (music ids; LLM ids without the mask) against its plan and write it into the
        song; the stage's report (``report`` adds the engine's timings)."""
        vocab = self.music.vocab
        if not use_mask:
            tokens = self.music.from_llm(tokens)
        errors = self.grammar.validate(tokens, stage.stream, stage.plan)
        info = {"tokens": vocab.describe(tokens), "new_tokens": len(tokens), "prompt_tokens": len(stage.prompt),
                "inputs": list(task_inputs(stage.task, stage.optional)), **report,
                "adapter": stage.task if stage.task in self.adapters else None, "grammar_errors": len(errors)}
        if errors:
            if use_mask:
                raise AssertionError(f"{stage.task}: masked decoding produced {errors[:2]}")
            raise SongError(f"{stage.task}: the unmasked model produced an ungrammatical stream: {errors[0]}")
        decode_body(tokens[:-1], stage.stream, song, vocab)
        return info

    def _plan(self, example, song: Song, task: str, request: Request, optional: tuple[str, ...]) -> Plan:
        """The grammar plan of a stage: the prompt's form and quotas, and the bars it keeps given (infilling; the
        tempo stage's first bar)."""
        plan = Plan.from_prompt(example.prompt, self.music.vocab)
        if request.regenerate is None:
            if task == "tempo":   # the requested tempo is where the song starts; the model writes how it moves on
                start = self.music.vocab.token("Tempo", base_tempo(song, self.music.vocab))
                plan = dataclasses.replace(plan, forced=((1, (start,)),))
            return plan
        keep = [bar for bar in range(song.n_bars) if bar not in set(request.regenerate)]
        # The kept bars come from the request as given: earlier stages may have changed what they did not write
        # (a melody stage has no velocities), the given song has not.
        source = request.song()
        self.prepare_stage(source, task)
        return dataclasses.replace(plan, forced=given_bars(source, task, self.music.vocab, keep, optional))

    def _guarded(self, plan: Plan, song: Song, stream: str, request: Request) -> Plan:
        """The plan with the harmony guard of its stream where the request keeps it on (and masks at all); the
        melodic stages' pitch guard follows ``song``'s chords, the ones their prompt gives."""
        if not (request.harmony_guard and request.use_mask):
            return plan
        return guard_plan(plan, stream, song, self.music.vocab)

    def prepare_stage(self, song: Song, task: str) -> None:
        """What a stage needs before it runs: dynamics perform the PIANO part too, so voice it first, and give
        velocities to the notes as the prompt writes them (canonical: one per onset and pitch, inside the form)."""
        if task == "dynamics":
            if not song.tracks["PIANO"] and song.chords:
                song.tracks["PIANO"] = voice_piano(song)
            song.tracks = quantized(song, self.music.vocab).tracks

    @staticmethod
    def after_stage(song: Song, task: str, request: Request) -> None:
        """What follows a stage: when infilling rewrote chords, the given accompaniment of the rewritten bars is
        voiced anew from them (it was written for the old chords)."""
        if task == "chord" and request.regenerate is not None and song.tracks["PIANO"]:
            span = set(request.regenerate)
            song.tracks["PIANO"] = sorted([n for n in song.tracks["PIANO"] if n.bar not in span] +
                                          [n for n in voice_piano(song) if n.bar in span])

    @staticmethod
    def stages_for(request: Request) -> list[str]:
        """The stages a request runs, in order; given chords, melody or secondary melody replace their stage."""
        if request.regenerate is not None:   # infilling rewrites the chosen bars of every requested stage
            return [task for task in SUBTASKS if task in request.stages]
        given = {"chord": bool(request.chords), "melody": bool(request.melody), "secondary": bool(request.bridge)}
        return [task for task in SUBTASKS if task in request.stages and not given.get(task)]


class Composer(StagePlanner):
    """The stage-1 model with every sub-task adapter loaded, decoding with musicray's own loop
    (``musicray.decode.generate``); one ``compose`` call makes one song."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", adapters: tuple[str, ...] = SUBTASKS,
                 tokens_per_bar: dict[str, int] | None = None):
        """Load the stage-1 model and the ``adapters`` found under ``run_dir/adapters`` (a sub-task without
        one runs on the stage-1 model alone); ``tokens_per_bar`` overrides the per-stage token caps."""
        run = RunDir(run_dir)
        model, music = load_music_model(run.require("stage-1 model"))
        found: list[str] = []
        for subtask in run.adapters_present(adapters):
            from peft import PeftModel

            path = run.adapter(subtask)
            if not found:
                model = PeftModel.from_pretrained(model, path, adapter_name=subtask)
            else:
                model.load_adapter(path, adapter_name=subtask)
            found.append(subtask)
        self.model = model.to(device).eval()
        super().__init__(music, Grammar(music.vocab, device), found, tokens_per_bar)

    def _use_adapter(self, subtask: str):
        if not self.adapters:
            return _no_adapter()
        if subtask in self.adapters:
            self.model.set_adapter(subtask)
            return _no_adapter()
        return self.model.disable_adapter()

    def run_stage(self, songs: list[Song], task: str, requests: list[Request]) -> list[dict]:
        """Generate one sub-task's stream for a batch of songs (one decode call) and write it into each song."""
        stages = self.stage_inputs(songs, task, requests)
        use_mask, sampling = requests[0].use_mask, requests[0].sampling_for(task)
        if any(r.use_mask != use_mask or r.sampling_for(task) != sampling for r in requests):
            raise ValueError("one batch shares its sampling settings and mask switch")
        with self._use_adapter(task):
            out = generate(self.model, self.music, self.grammar, [s.prompt for s in stages], [s.stream for s in stages],
                           [s.plan for s in stages], [s.budget for s in stages], [s.seed for s in stages],
                           sampling, use_mask=use_mask)
        report = {"seconds": round(out.seconds, 3), "mask_seconds": round(out.mask_seconds, 3), "batch": len(songs)}
        return [self.write_stage(song, stage, tokens, use_mask, report)
                for song, stage, tokens in zip(songs, stages, out.tokens)]

    @torch.no_grad()
    def run_stages(self, songs: list[Song], requests: list[Request], stages: list[list[str]] | None = None,
                   isolate_failures: bool = False, finish_songs: bool = True) -> list[Composition]:
        """The stage loop, the one place it is written: every stage in order (``stages_for`` of each request, or
        the given ``stages`` per song), one decode call per stage over the songs that run it, then ``finish``.

        Songs are changed in place. A stage that fails raises, or with ``isolate_failures`` is run again song by
        song so that only the songs at fault stop (their ``Composition`` says where and why)."""
        to_run = stages if stages is not None else [self.stages_for(request) for request in requests]
        results = [Composition(song) for song in songs]
        for task in SUBTASKS:
            rows = [i for i, tasks in enumerate(to_run) if task in tasks and results[i].failed_stage is None]
            if not rows:
                continue
            for group in self._sampling_groups(task, rows, requests):
                self._run_group(task, group, songs, requests, results, isolate_failures)
        if finish_songs:
            for result in results:
                if result.failed_stage is not None:
                    continue
                try:
                    finish(result.song)
                except SongError as err:
                    if not isolate_failures:
                        raise
                    result.failed_stage, result.error = "finish", err
        return results

    @staticmethod
    def _sampling_groups(task: str, rows: list[int], requests: list[Request]) -> list[list[int]]:
        """Rows that can share ``task``'s decode call (same sampling settings for it and mask switch)."""
        groups: dict[tuple, list[int]] = {}
        for i in rows:
            groups.setdefault((requests[i].sampling_for(task), requests[i].use_mask), []).append(i)
        return list(groups.values())

    def _run_group(self, task: str, rows: list[int], songs: list[Song], requests: list[Request],
                   results: list["Composition"], isolate_failures: bool) -> None:
        try:
            for i in rows:
                self.prepare_stage(songs[i], task)
            infos = self.run_stage([songs[i] for i in rows], task, [requests[i] for i in rows])
            for i in rows:
                self.after_stage(songs[i], task, requests[i])
        except Exception as err:
            if not isolate_failures:
                raise
            if len(rows) > 1:   # find the song at fault; the others still get their stage
                for i in rows:
                    self._run_group(task, [i], songs, requests, results, isolate_failures)
            else:
                results[rows[0]].failed_stage, results[rows[0]].error = task, err
            return
        for i, info in zip(rows, infos):
            results[i].stages[task] = info

    def compose(self, request: Request) -> tuple[Song, dict]:
        """One song; raises on the first stage that fails."""
        song = request.song()
        started = time.perf_counter()
        result = self.run_stages([song], [request])[0]
        return song, {"stages": result.stages, "form": song.form, "key": song.key, "metre": song.metre,
                      "seconds": round(time.perf_counter() - started, 3)}


@dataclass
class Composition:
    """What ``Composer.run_stages`` did to one song: each stage's report, or where and why it stopped."""

    song: Song
    stages: dict[str, dict] = field(default_factory=dict)
    failed_stage: str | None = None
    error: BaseException | None = None


def finish(song: Song) -> None:
    """Voice the accompaniment if no stage did, and check the result."""
    if not song.tracks["PIANO"] and song.chords:
        song.tracks["PIANO"] = voice_piano(song)
    song.check()


class _no_adapter:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
