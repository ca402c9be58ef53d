"""The composer: chords -> melody -> secondary melody -> dynamics -> tempo, each stage with its sub-task's
LoRA adapter on the shared stage-1 model, each conditioned on the stages before it.

Given chords skip the chord stage, a given secondary melody the secondary stage; a given melody skips the melody
stage and the chord stage writes chords for it (the chord task's optional melody input); ``stages`` runs a subset
(e.g. only dynamics and tempo to perform a song whose notes are given). PIANO is the chords voiced into a simple accompaniment (bass + close triad per change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from musicray.accompaniment import voice_piano  # also read as musicray.compose.voice_piano
from musicray.encoding import decode_body, encode, given_bars
from musicray.engine.decode import generate
from musicray.errors import MissingRunPart
from musicray.grammar import Grammar, Plan
from musicray.harmony_guard import guard_plan
from musicray.model import MusicTokenizer, load_music_model
from musicray.request import Request
from musicray.run import RunDir
from musicray.song import Song, SongError
from musicray.streams import available_inputs, task_inputs
from musicray.tasks import SUBTASK_RECORDS, keep_given, stages_rewriting, subtask
from musicray.tokens import SUBTASKS

# Each stage's token cap per bar (``SubTask.tokens_per_bar``); a planner's ``tokens_per_bar`` overrides it.
TOKENS_PER_BAR: dict[str, int] = {name: task.tokens_per_bar for name, task in SUBTASK_RECORDS.items()}


class StageFailed(Exception):
    """A stage could not be composed (the engine refused it, its answer failed the check, or its deployment is
    gone): ``stage`` names it, ``error`` is the cause, ``status`` the HTTP status that reports it."""

    def __init__(self, stage: str, error: BaseException | str, status: int = 500):
        super().__init__(error if isinstance(error, str) else f"{stage}: {type(error).__name__}: {error}")
        self.stage, self.error, self.status = stage, error, status


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


def token_budgets(grammar: Grammar, stream: str, plans: list[Plan], tokens_per_bar: int) -> list[int]:
    """Each plan's token budget for a stage writing ``stream``: the fewest tokens that finish it under the grammar,
    plus ``tokens_per_bar`` for every bar the model writes (bars the plan forces are given)."""
    minimum = grammar.tokens_to_finish(grammar.start([stream] * len(plans), plans)).tolist()
    return [m + tokens_per_bar * (plan.n_bars - len(plan.forced)) for m, plan in zip(minimum, plans)]


class StagePlanner:
    """The model-free half of a stage: ``begin_stage`` (prepare the song; prompt, plan, budget and seed) before
    decoding, ``end_stage`` (check the answer, write it into the song, what follows) after it, and which stages a
    request runs (``stages_for``, ``check_adapters``). Every engine shares it (``Composer``: musicray's own loop;
    the vLLM engine of ``musicray.engine``) and the evaluation builds its single stages with ``stage_inputs``, so
    all compose from the same prompts under the same grammar; an engine only decodes."""

    def __init__(self, music: MusicTokenizer, grammar: Grammar, adapters: list[str],
                 tokens_per_bar: dict[str, int] | None = None, run_dir: str | Path | None = None):
        """``adapters``: the sub-tasks whose adapter the engine holds; ``run_dir`` is named when one is missing."""
        self.music, self.grammar, self.adapters = music, grammar, list(adapters)
        self.tokens_per_bar = {**TOKENS_PER_BAR, **(tokens_per_bar or {})}
        self.run_dir = run_dir

    def check_adapters(self, tasks: list[str], request: Request) -> None:
        """Refuse (``MissingRunPart`` naming the sub-tasks and the run dir) to run a stage without its adapter,
        unless the request allows it (``allow_missing_adapters``; ``--no-adapters`` sets it): a stage on the
        stage-1 model alone is another model, and its report's ``"adapter": null`` is easy to miss."""
        missing = [task for task in tasks if self.adapter_of(task) is None]
        if missing and not request.allow_missing_adapters:
            where = f"{self.run_dir}/adapters" if self.run_dir is not None else "this engine"
            raise MissingRunPart(
                f"adapters: no LoRA adapter for {', '.join(missing)} in {where}; train them (musicray tune), or "
                "run those stages on the stage-1 model alone with --allow-missing-adapters (HTTP: "
                "allow_missing_adapters) or every stage with --no-adapters")

    def stage_inputs(self, songs: list[Song], task: str, requests: list[Request],
                     optional: list[tuple[str, ...]] | None = None) -> list[StageInput]:
        """Each song's ``task`` stage as the composer runs it for its request: prompt, plan, budget and seed (the
        one place they are computed). The prompt carries the task's optional inputs the song has, or the given
        ``optional`` ones per song (the evaluation asks for a real song's stage without them)."""
        vocab = self.music.vocab
        stream = subtask(task).target
        if optional is None:
            optional = [available_inputs(song, task) for song in songs]
        examples = [encode(song, task, vocab, given) for song, given in zip(songs, optional)]
        plans = [self._guarded(self._plan(example, song, task, request, given), song, stream, request)
                 for example, song, request, given in zip(examples, songs, requests, optional)]
        budgets = token_budgets(self.grammar, stream, plans, self.tokens_per_bar[task])
        return [StageInput(task, stream, given, plan, budget, self.music.prompt_ids(example),
                           request.seed * 1009 + SUBTASKS.index(task))
                for example, given, plan, budget, request in zip(examples, optional, plans, budgets, requests)]

    def write_stage(self, song: Song, stage: StageInput, tokens: list[int], use_mask: bool, report: dict) -> dict:
        """Check a stage's answer (music ids; LLM ids without the mask) against its plan and write it into the
        song; the stage's report (``report`` adds the engine's timings)."""
        vocab = self.music.vocab
        if not use_mask:
            tokens = self.music.from_llm(tokens)
        errors = self.grammar.validate(tokens, stage.stream, stage.plan)
        info = {"tokens": vocab.describe(tokens), "new_tokens": len(tokens), "prompt_tokens": len(stage.prompt),
                "inputs": list(task_inputs(stage.task, stage.optional)), **report,
                "adapter": self.adapter_of(stage.task), "grammar_errors": len(errors)}
        if errors:
            if use_mask:
                raise AssertionError(f"{stage.task}: masked decoding produced {errors[:2]}")
            raise SongError(f"{stage.task}: the unmasked model produced an ungrammatical stream: {errors[0]}")
        decode_body(tokens[:-1], stage.stream, song, vocab)
        return info

    def _plan(self, example, song: Song, task: str, request: Request, optional: tuple[str, ...]) -> Plan:
        """The grammar plan of a stage: the prompt's form and quotas, the bars it keeps given (infilling; the
        tempo stage's first bar and a tempo direction's bars), and the returning bars that repeat their first
        occurrence."""
        plan = Plan.from_prompt(example.prompt, self.music.vocab)
        forced: tuple = ()
        if request.regenerate is None:
            forced_bars = subtask(task).forced_bars
            if forced_bars is not None:
                forced = forced_bars(song, self.music.vocab, request.tempo_direction)
        else:
            keep = [bar for bar in range(song.n_bars) if bar not in set(request.regenerate)]
            # The kept bars come from the request as given: earlier stages may have changed what they did not
            # write (a melody stage has no velocities), the given song has not.
            source = request.song()
            self.prepare_stage(source, task)
            forced = given_bars(source, task, self.music.vocab, keep, optional)
        returns = subtask(task).returns
        given = {bar for bar, _ in forced}
        copies = [(bar + 1, first + 1) for bar, first in request.returns() if bar + 1 not in given]
        copies = returns(copies, example.prompt, self.music.vocab) if returns is not None and copies else []
        return dataclasses.replace(plan, forced=forced, copies=tuple(copies))

    def begin_stage(self, songs: list[Song], task: str, requests: list[Request]) -> list[StageInput]:
        """The first half of a stage, for every engine: prepare each song (``prepare_stage``), then build what its
        stage decodes from (``stage_inputs``)."""
        for song in songs:
            self.prepare_stage(song, task)
        return self.stage_inputs(songs, task, requests)

    def end_stage(self, song: Song, stage: StageInput, tokens: list[int], request: Request, report: dict) -> dict:
        """The second half, for every engine: check the answer and write it into the song (``write_stage``), then
        what follows the stage (``after_stage``); the stage's report."""
        info = self.write_stage(song, stage, tokens, request.use_mask, report)
        self.after_stage(song, stage.task, request)
        return info

    def _guarded(self, plan: Plan, song: Song, stream: str, request: Request) -> Plan:
        """The plan with the harmony guard of its stream where the request keeps it on (and masks at all); the
        melodic stages' pitch guard follows ``song``'s chords, the ones their prompt gives."""
        if not (request.harmony_guard and request.use_mask):
            return plan
        return guard_plan(plan, stream, song, self.music.vocab)

    def prepare_stage(self, song: Song, task: str) -> None:
        """What a stage needs in the song before it runs (``SubTask.prepare``: dynamics voice the PIANO part)."""
        prepare = subtask(task).prepare
        if prepare is not None:
            prepare(song, self.music.vocab)

    @staticmethod
    def after_stage(song: Song, task: str, request: Request) -> None:
        """What follows a stage that rewrote bars of a given song: what it did not rewrite goes back exactly as
        given (``keep_given``), then ``SubTask.after_infilling`` (rewritten chords re-voice the given
        accompaniment of those bars, which was written for the old chords)."""
        if request.regenerate is None:
            return
        keep_given(song, request.song(), task, tuple(request.regenerate), request.regenerate_tracks)
        after = subtask(task).after_infilling
        if after is not None:
            after(song, tuple(request.regenerate))

    def adapter_of(self, task: str) -> str | None:
        """The LoRA adapter ``task`` runs under here, or None where it runs on the stage-1 model alone."""
        adapter = subtask(task).adapter
        return adapter if adapter in self.adapters else None

    @staticmethod
    def stages_for(request: Request) -> list[str]:
        """The stages a request runs, in order; a part the request gives (``SubTask.given_by``: chords, melody,
        secondary melody) replaces its stage."""
        if request.regenerate_tracks is not None:   # infilling by track: the stages that write those tracks
            return stages_rewriting(request.regenerate_tracks, request.stages)
        if request.regenerate is not None:   # infilling rewrites the chosen bars of every requested stage
            return [task for task in SUBTASKS if task in request.stages]
        return [task for task, record in SUBTASK_RECORDS.items() if task in request.stages
                and not (record.given_by and getattr(request, record.given_by))]


class Composer(StagePlanner):
    """The stage-1 model with every sub-task adapter loaded, decoding with musicray's own loop
    (``musicray.engine.decode.generate``); one ``compose`` call makes one song."""

    def __init__(self, run_dir: str | Path, device: str = "cpu", adapters: tuple[str, ...] = SUBTASKS,
                 tokens_per_bar: dict[str, int] | None = None, dtype: torch.dtype = torch.float32):
        """Load the stage-1 model (in ``dtype``) and the ``adapters`` found under ``run_dir/adapters`` (a stage
        whose adapter is missing is refused unless its request allows it: ``check_adapters``); ``tokens_per_bar``
        overrides the per-stage token caps."""
        run = RunDir(run_dir)
        model, music = load_music_model(run.require("stage-1 model"), dtype)
        found: list[str] = []
        for name in run.adapters_present(adapters):
            from peft import PeftModel

            path = run.adapter(name)
            if not found:
                model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
            found.append(name)
        self.model = model.to(device).eval()
        super().__init__(music, Grammar(music.vocab, device), found, tokens_per_bar, run.root)

    @contextlib.contextmanager
    def use_adapter(self, task: str | None):
        """The model as it runs ``task``: under the task's LoRA adapter where this composer holds it, on the
        stage-1 model alone where it does not or ``task`` is None (PEFT's ``disable_adapter``)."""
        adapter = self.adapter_of(task) if task is not None else None
        if not self.adapters:
            yield self.model
        elif adapter is not None:
            self.model.set_adapter(adapter)
            yield self.model
        else:
            with self.model.disable_adapter():
                yield self.model

    def run_stage(self, songs: list[Song], task: str, requests: list[Request]) -> list[dict]:
        """One sub-task's stage for a batch of songs: ``begin_stage``, one decode call, ``end_stage`` per song."""
        stages = self.begin_stage(songs, task, requests)
        use_mask, sampling = requests[0].use_mask, requests[0].sampling_for(task)
        if any(r.use_mask != use_mask or r.sampling_for(task) != sampling for r in requests):
            raise ValueError("one batch shares its sampling settings and mask switch")
        with self.use_adapter(task):
            out = generate(self.model, self.music, self.grammar, [s.prompt for s in stages], [s.stream for s in stages],
                           [s.plan for s in stages], [s.budget for s in stages], [s.seed for s in stages],
                           sampling, use_mask=use_mask)
        report = {"seconds": round(out.seconds, 3), "mask_seconds": round(out.mask_seconds, 3), "batch": len(songs),
                  "forward_calls": out.forward_calls}
        return [self.end_stage(song, stage, tokens, request, report)
                for song, stage, tokens, request in zip(songs, stages, out.tokens, requests)]

    @torch.no_grad()
    def run_stages(self, songs: list[Song], requests: list[Request], stages: list[list[str]] | None = None,
                   isolate_failures: bool = False, finish_songs: bool = True) -> list[Composition]:
        """The stage loop, the one place it is written: every stage in order (``stages_for`` of each request, or
        the given ``stages`` per song), one decode call per stage over the songs that run it, then ``finish``.

        Songs are changed in place. A stage that fails raises, or with ``isolate_failures`` is run again song by
        song so that only the songs at fault stop (their ``Composition`` says where and why)."""
        to_run = stages if stages is not None else [self.stages_for(request) for request in requests]
        results = [Composition(song) for song in songs]
        for result, tasks, request in zip(results, to_run, requests):
            try:
                self.check_adapters(tasks, request)
            except MissingRunPart as err:
                if not isolate_failures:
                    raise
                result.failed_stage, result.error = next(t for t in tasks if self.adapter_of(t) is None), err
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
            infos = self.run_stage([songs[i] for i in rows], task, [requests[i] for i in rows])
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

