"""``musicray eval``: the evaluation report of a run on the test split of its data.

What it measures (``evaluate_run``):

1. generated vs real: the test songs' windows (``musicray.eval.generation``) composed again from their plan by
   the composer (stage-1 model + LoRA adapters, grammar mask on, batched), and the song metrics of
   ``musicray.eval.metrics`` on the generated songs, on the same real windows and on the whole real test songs;
2. teacher-forced loss and next-token accuracy per sub-task on the test split, with the sub-task's adapter and
   with the stage-1 model alone (``musicray.eval.teacher_forced``);
3. the thesis' ablations in one table: the grammar mask at generation on/off, the mask in the stage-1 loss
   on/off (a second stage-1 model in ``RUN/ablations/mask_loss_<on|off>``, "not run" when absent), and the LoRA
   adapters vs the stage-1 model alone;
4. structure and key (``musicray.eval.structure``): returning sections, scale consistency, pitch range and pitch
   classes per track (MusPy), chord time in the key's scale, each as a mean with a 95 % bootstrap interval for the
   generated songs, the real songs of the same forms and the whole test songs, the goals met or not, and a
   real-vs-generated classifier; with ``eval.sampling_ablation`` / ``eval.guard_ablation`` the same windows
   composed again at temperature 1 / with the harmony guard off sit beside them (and in the ablation table);
5. plots (``musicray.eval.plots``): piano rolls, velocity and tempo curves against the real window, the stage-1
   training curves, the stage-2 sweep table.

It writes ``report.json`` (every figure), ``report.md`` (the tables, with links to the plots), ``plots/*.png``
and the generated and real windows as MIDI in ``songs/`` (``musicray.run.EvalDir``). This module runs the
evaluation; ``musicray.eval.figures`` computes its figures and ``musicray.eval.markdown`` renders ``report.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from musicray.data.layout import DataDir
from musicray.eval.figures import GUARD_OFF, TEMPERATURE_ONE, ablation_figures, add_language_ablation, generated_vs_real
from musicray.eval.generation import (
    Composed,
    StageStream,
    Window,
    compose_batch,
    compose_each,
    eval_windows,
    split_songs,
    stage_streams,
)
from musicray.eval.markdown import render_markdown
from musicray.eval.relations import relation_scores, return_copy_scores
from musicray.eval.structure import SOURCES as STRUCTURE_SOURCES
from musicray.eval.structure import structure_report
from musicray.eval.teacher_forced import Scores, held_out_dataset, teacher_forced
from musicray.grammar import Grammar
from musicray.request import Request
from musicray.run import EvalDir, RunDir
from musicray.sampling import Sampling, stage_sampling
from musicray.song import Song, SongError
from musicray.tokens import SUBTASKS, Vocabulary
from musicray.train.config import Config, EvalConfig, run_config

SOURCES = (
    ("Wu, S.-L. & Yang, Y.-H. (2020). The Jazz Transformer on the Front Line: Exploring the Shortcomings of "
     "AI-composed Music through Quantitative Measures. ISMIR 2020; code: github.com/slSeanWU/MusDr "
     "(pitch-class entropy H, grooving pattern similarity GS)."),
    ("Yeh, Y.-C. et al. (2021). Automatic melody harmonization with triad chords: A comparative study. "
     "Journal of New Music Research 50(1) (chord tones n_c, non-chord tones n_n, CTnCTR)."),
    ("Chu (NCU, 2025). Music Generation with Structure Control and Performance Expression via Pretrained LLaMA "
     "Model (structure control, the grammar mask, the ablations)."),
)


def check_inputs(run_dir: Path, data_dir: Path) -> None:
    """One-line errors for a run or data dir that cannot be evaluated."""
    if not Path(run_dir).is_dir():
        raise SongError(f"--run: {run_dir} does not exist")
    RunDir(run_dir).require("stage-1 model")
    if not DataDir(data_dir).is_prepared():
        raise SongError(f"--data: {data_dir} is not a prepared data dir (no {DataDir(data_dir).songs.name}); run "
                        "`musicray data prepare` or `musicray data synth`, or pass the data dir the run was trained on")


def settings_for(run_dir: str | Path, **overrides) -> EvalConfig:
    """The run config's ``eval`` settings with the ``overrides`` that are not None (command-line flags)."""
    return dataclasses.replace(run_config(Path(run_dir)).eval,
                               **{name: value for name, value in overrides.items() if value is not None})


# -- the run -------------------------------------------------------------------------------------------------

class _Clock:
    """Seconds per part of the evaluation, each announced on the log as it starts and ends."""

    def __init__(self, log):
        self.log, self.seconds, self.started = log, {}, time.perf_counter()

    @contextlib.contextmanager
    def part(self, name: str):
        self.log(f"   {name} ...")
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.log(f"   {name}: {self.seconds[name]} s")


def _teacher_forced_all(composer, data_dir: Path, settings: EvalConfig, config: Config, with_adapters: bool
                        ) -> tuple[dict[str, Scores | None], dict[str, Scores]]:
    """(with each sub-task's adapter, stage-1 alone) scores per sub-task on the test examples, windowed and cut as
    the run's training examples were (``config.data``); None where the sub-task has no adapter."""
    grammar = composer.grammar
    adapter_scores: dict[str, Scores | None] = {}
    alone: dict[str, Scores] = {}
    for task in SUBTASKS:
        dataset = held_out_dataset(data_dir, task, composer.music, config.data.max_length, config.data.max_bars,
                                   settings.max_examples or None)
        if with_adapters:
            if composer.adapter_of(task) is not None:
                with composer.use_adapter(task):
                    adapter_scores[task] = teacher_forced(composer.model, composer.music, dataset, grammar,
                                                          settings.batch_size)
            else:
                adapter_scores[task] = None
        with composer.use_adapter(None):
            alone[task] = teacher_forced(composer.model, composer.music, dataset, grammar, settings.batch_size)
    return adapter_scores, alone


COPY_WINDOW_BARS = 16   # the copy relation's test windows: long enough to hold a section and its return


def _relations(composer, data_dir: Path, settings: EvalConfig, config: Config) -> dict:
    """Teacher-forced relation scores (``musicray.eval.relations``) of the chord, melody and tempo sub-tasks, each
    under its adapter where it has one, on the same test examples as the teacher-forced scores; and the copy of
    returning sections (melody adapter) on test windows of at least ``COPY_WINDOW_BARS`` bars."""
    datasets = {task: held_out_dataset(data_dir, task, composer.music, config.data.max_length, config.data.max_bars,
                                       settings.max_examples or None) for task in ("chord", "melody", "tempo")}
    with composer.use_adapter("chord"):
        chord = relation_scores(composer.model, composer.music, None, None, settings.batch_size, datasets["chord"])
    with composer.use_adapter("melody"):
        melody = relation_scores(composer.model, composer.music, datasets["melody"], None, settings.batch_size)
    with composer.use_adapter("tempo"):
        tempo = relation_scores(composer.model, composer.music, None, datasets["tempo"], settings.batch_size)
    # Returns need several sections in one window: at least COPY_WINDOW_BARS bars, whatever the run trained on.
    returning = held_out_dataset(data_dir, "melody", composer.music, config.data.max_length,
                                 max(config.data.max_bars or 0, COPY_WINDOW_BARS))
    with composer.use_adapter("melody"):
        copies = return_copy_scores(composer.model, composer.music, returning, settings.batch_size,
                                    settings.max_examples or None)
    return {"language": composer.music.vocab.config.language,
            "chord_tone_mass": melody.chord_tone_mass, "real_chord_tone": melody.real_chord_tone,
            "scale_mass": melody.scale_mass, "real_in_scale": melody.real_in_scale,
            "tempo_hold": tempo.tempo_hold, "real_tempo_hold": tempo.real_tempo_hold,
            "diatonic_chord_mass": chord.diatonic_chord_mass, "real_diatonic_chord": chord.real_diatonic_chord,
            "pitch_positions": melody.pitch_positions, "tempo_positions": tempo.tempo_positions,
            "chord_positions": chord.chord_positions,
            "return_copy_p": copies.copy_p, "return_first_p": copies.first_p, "copy_positions": copies.copy_positions,
            "copyable_bars": copies.copyable_bars, "returning_bars": copies.returning_bars}


@dataclass
class _Evaluation:
    """What every part of one evaluation reads: the run, the data, the settings, the device, and the clock."""

    run: RunDir
    data_dir: Path
    config: Config
    settings: EvalConfig
    device: str
    clock: _Clock

    def composer(self, run: RunDir | None = None, adapters: tuple[str, ...] = SUBTASKS):
        from musicray.compose import Composer

        return Composer((run or self.run).root, self.device, adapters=adapters)


@dataclass
class _WithAdapters:
    """The run's model under its adapters: the windows it composed (mask on, batched; mask off, one at a time), its
    single stages from the real inputs (mask on and off), teacher-forced scores and relations."""

    windows: list[Window]
    adapters: list[str]
    vocab: Vocabulary
    grammar: Grammar
    generated: list[Composed]
    unmasked: list[Composed]
    stages: dict[bool, list[StageStream]]
    tf_adapter: dict[str, Scores | None]
    tf_alone: dict[str, Scores]
    relations: dict
    variants: dict[str, list[Composed]]   # the same windows composed with one setting changed (_variant_requests)


def _with_adapters(ev: _Evaluation, test_songs: list[Song]) -> _WithAdapters:
    settings, clock = ev.settings, ev.clock
    composer = ev.composer()
    windows = eval_windows(test_songs, settings.songs, settings.max_bars, composer.music.vocab, settings.seed,
                           stage_sampling(settings.sampling, Sampling(), "eval.sampling"), settings.window,
                           settings.variation)
    with clock.part(f"compose {len(windows)} windows (mask on, adapters, batched)"):
        generated = compose_batch(composer, [w.request for w in windows])
    variants = {}
    for label, changed in _variant_requests(settings, windows).items():
        with clock.part(f"compose the {len(windows)} windows again, {label} (mask on, adapters, batched)"):
            variants[label] = compose_batch(composer, changed)
    few = ablation_windows(settings, windows)
    with clock.part(f"compose {len(few)} windows (mask off, adapters, one at a time)"):
        unmasked = compose_each(composer, [dataclasses.replace(w.request, use_mask=False) for w in few])
    with clock.part(f"single stages from the real inputs of {len(few)} windows (mask on and off)"):
        stages = {use_mask: [s for task in SUBTASKS for s in stage_streams(composer, few, task, use_mask)]
                  for use_mask in (True, False)}
    with clock.part("teacher-forced scores (adapters, stage-1 alone)"):
        tf_adapter, tf_alone = _teacher_forced_all(composer, ev.data_dir, settings, ev.config, True)
    with clock.part("relations (chord tones, key, tempo hold)"):
        relations = _relations(composer, ev.data_dir, settings, ev.config)
    return _WithAdapters(windows, list(composer.adapters), composer.music.vocab, composer.grammar, generated,
                         unmasked, stages, tf_adapter, tf_alone, relations, variants)


def ablation_windows(settings: EvalConfig, windows: list[Window]) -> list[Window]:
    """The windows of the ablations that run stage by stage or without the mask (``eval.ablation_windows``)."""
    return windows if settings.ablation_windows is None else windows[:settings.ablation_windows]


def _variant_requests(settings: EvalConfig, windows: list[Window]) -> dict[str, list[Request]]:
    """The windows' requests with one setting changed, for the variants the eval settings ask for: every stage at
    temperature 1 (``sampling_ablation``, when ``eval.sampling`` sets something else) and the harmony guard off
    (``guard_ablation``). Same seeds, so a variant differs from the main composition by that setting alone."""
    requests = [w.request for w in windows]
    variants = {}
    if settings.sampling_ablation and any(r.stage_sampling for r in requests):
        variants[TEMPERATURE_ONE] = [dataclasses.replace(r, stage_sampling=None) for r in requests]
    if settings.guard_ablation:
        variants[GUARD_OFF] = [dataclasses.replace(r, harmony_guard=False) for r in requests]
    return variants


def _stage1_alone(ev: _Evaluation, windows: list[Window]) -> dict:
    """The run's stage-1 model without adapters: the same windows (mask on), single stages (mask off), relations."""
    plain = ev.composer(adapters=())
    with ev.clock.part("compose (mask on, stage-1 alone)"):
        generated = compose_batch(plain, [w.request for w in windows])
    with ev.clock.part("single stages, mask off, stage-1 alone"):
        stages = [s for task in SUBTASKS for s in stage_streams(plain, ablation_windows(ev.settings, windows), task,
                                                                use_mask=False)]
    with ev.clock.part("relations, stage-1 alone (the language ablation's row)"):
        relations = _relations(plain, ev.data_dir, ev.settings, ev.config)
    return {"generated": generated, "stages": stages, "relations": relations}


def _loss_mask_arm(ev: _Evaluation, windows: list[Window], notes: list[str]) -> dict | None:
    """The stage-1 model trained with the other ``stage1.mask_loss`` (``RUN/ablations``), or None (with a note)
    where the pipeline did not train it."""
    other = not ev.config.stage1.mask_loss
    arm_run = ev.run.ablation(other)
    if not arm_run.has_model():
        notes.append(f"loss-mask ablation not run: no stage-1 model in {arm_run.root} (the pipeline trains it when "
                     "eval.mask_loss_ablation is true)")
        return None
    arm = ev.composer(arm_run, adapters=())
    with ev.clock.part(f"loss-mask ablation (stage1.mask_loss={str(other).lower()})"):
        _, arm_tf = _teacher_forced_all(arm, ev.data_dir, ev.settings, ev.config, False)
        arm_stages = [s for task in SUBTASKS for s in stage_streams(arm, ablation_windows(ev.settings, windows), task,
                                                                    use_mask=False)]
    return {"dir": str(arm_run.root), "teacher_forced": arm_tf, "stages": arm_stages}


def _language_arm(ev: _Evaluation, windows: list[Window], contrast: str, notes: list[str]) -> dict | None:
    """The stage-1 model trained in the contrasting music language (``RUN/ablations``), or None (with a note)."""
    arm_run = ev.run.language_ablation(contrast)
    if not arm_run.has_model():
        notes.append(f"language ablation not run: no stage-1 model in {arm_run.root} (the pipeline trains it when "
                     "eval.language_ablation is true)")
        return None
    arm = ev.composer(arm_run, adapters=())
    with ev.clock.part(f"language ablation (stage 1 in the {contrast} language)"):
        return {"dir": str(arm_run.root), "language": contrast,
                "generated": compose_batch(arm, [w.request for w in windows]),
                "relations": _relations(arm, ev.data_dir, ev.settings, ev.config)}


def evaluate_run(run_dir: str | Path, data_dir: str | Path, out_dir: str | Path, settings: EvalConfig | None = None,
                 device: str | None = None, progress: bool = True) -> dict:
    """Evaluate a run on the test split of ``data_dir``; write the report into ``out_dir``; return report.json's
    contents. Each model is loaded in turn and let go before the next (one model in memory at a time)."""
    run_dir, data_dir, out_dir = (Path(p).expanduser().resolve() for p in (run_dir, data_dir, out_dir))
    check_inputs(run_dir, data_dir)
    config = run_config(run_dir)
    settings = settings or config.eval
    dataclasses.replace(config, eval=settings).validate()   # the same bounds as a config file's eval: section
    ev = _Evaluation(RunDir(run_dir), data_dir, config, settings, device or ("cuda" if torch.cuda.is_available()
                     else "cpu"), _Clock((lambda text: print(text, flush=True)) if progress else (lambda text: None)))
    out = EvalDir(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)

    test_songs = split_songs(data_dir)
    main = _with_adapters(ev, test_songs)
    windows = main.windows
    notes = _setup_notes(settings, config, windows, main.adapters)
    plain = _stage1_alone(ev, windows)
    loss_arm = _loss_mask_arm(ev, windows, notes)
    contrast = config.vocab.contrast().language
    language_arm = _language_arm(ev, windows, contrast, notes)

    out.songs.mkdir(exist_ok=True)
    _write_songs(windows, main.generated, out.songs)
    with ev.clock.part("plots"):
        plots = _plots(ev.run, out, windows, main.generated)
    with ev.clock.part("metrics of the generated and real songs"):
        metrics = generated_vs_real(main.generated, windows, test_songs, main.grammar)
        ablations = ablation_figures(main.generated, main.unmasked, plain["generated"], main.stages, plain["stages"],
                                     main.tf_adapter, main.tf_alone, config.stage1.mask_loss, loss_arm,
                                     [w.song for w in windows], main.vocab, main.variants)
        add_language_ablation(ablations, plain["generated"], plain["relations"], contrast, language_arm)
    with ev.clock.part("structure and key (MusPy, bootstrap intervals, real-vs-generated classifier)"):
        structure = structure_report(_songs(main.generated), [w.song for w in windows], test_songs,
                                     seed=settings.seed,
                                     variants={label: _songs(composed) for label, composed in main.variants.items()})
    report = {
        "run_dir": str(run_dir), "data_dir": str(data_dir), "device": ev.device,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(settings),
        "notes": notes,
        "windows": [{"source_song": w.source_id, "form": w.song.form, "key": w.song.key, "metre": w.song.metre,
                     "tempo": w.request.tempo, "seed": w.request.seed, "cut": w.cut} for w in windows],
        "metrics": metrics,
        "structure": structure,
        "teacher_forced": {task: {"adapter": main.tf_adapter[task].to_dict() if main.tf_adapter[task] else None,
                                  "stage1": main.tf_alone[task].to_dict()} for task in SUBTASKS},
        "ablations": ablations,
        "relations": main.relations,
        "plots": plots,
        "seconds": {**ev.clock.seconds, "total": round(time.perf_counter() - ev.clock.started, 2)},
        "sources": [*SOURCES, *STRUCTURE_SOURCES],
    }
    out.report_json.write_text(json.dumps(report, indent=1))
    out.report_md.write_text(render_markdown(report))
    ev.clock.log(f"   wrote {out.report_md} and {out.report_json.name}")
    return report


def _songs(composed: list[Composed]) -> list[Song]:
    return [c.song for c in composed if c.song is not None]


def _setup_notes(settings: EvalConfig, config: Config, windows: list[Window], adapters: list[str]) -> list[str]:
    """What the report's reader must know about how its figures were made."""
    notes = []
    without_adapter = [task for task in SUBTASKS if task not in adapters]
    if without_adapter:
        notes.append(f"no LoRA adapter for {', '.join(without_adapter)}: the composer runs those stages on the "
                     "stage-1 model alone, and the teacher-forced 'adapter' scores of those sub-tasks are empty")
    if settings.window == "form":
        notes.append(f"generation: {len(windows)} test songs with a returning section in their first "
                     f"{settings.max_bars} bars, composed as those bars ({sum(w.cut for w in windows)} window(s) end "
                     "inside a section) from the real window's form, key, metre and base tempo; the comparison is "
                     "with the same real windows and with the whole real test songs")
    else:
        notes.append(f"generation: {len(windows)} test songs, one window each of at most {settings.max_bars} bars "
                     f"(whole sections; {sum(w.cut for w in windows)} window(s) are the first {settings.max_bars} "
                     "bars of a longer section), composed from the real window's form, key, metre and base tempo, to "
                     "keep composing fast on a CPU; the comparison is with the same real windows and with the whole "
                     "real test songs")
    if settings.ablation_windows is not None and settings.ablation_windows < len(windows):
        notes.append(f"mask off and single stages: the first {settings.ablation_windows} of the {len(windows)} "
                     "windows (eval.ablation_windows); the mask-off songs composed one at a time")
    variation = windows[0].request.variation
    notes.append("returning sections: " + ("as the model writes them (no variation set)" if variation is None else
                 f"variation {variation:g} (each returning bar repeats its first occurrence with probability "
                 f"{1 - variation:g})"))
    own = windows[0].request.stage_sampling or {}   # what eval_windows gave every window's request
    sampled = "; ".join(f"{stage} at temperature {s.temperature:g}" + (f", top-k {s.top_k}" if s.top_k else "")
                        + (f", top-p {s.top_p:g}" if s.top_p < 1 else "") for stage, s in own.items())
    notes.append(f"sampling: {sampled + '; the other stages ' if own else ''}temperature 1, no top-k or top-p cut, "
                 "the composer's per-stage seeds and token caps; single-stage generations take their prompt's inputs "
                 "from the real window")
    examples = f"the first {settings.max_examples} test examples" if settings.max_examples else "all test examples"
    notes.append(f"teacher-forced scores: {examples} per sub-task in song order, windowed "
                 f"(data.max_bars={config.data.max_bars}) and cut (data.max_length={config.data.max_length}) as the "
                 "run's training examples were; the chord task has one example without and one with its optional "
                 "melody input per window")
    return notes


def _write_songs(windows: list[Window], generated: list[Composed], out: Path) -> None:
    from musicray.midi import write_midi

    for i, (window, composed) in enumerate(zip(windows, generated)):
        stem = f"window{i}_{window.source_id}_{window.song.form}"
        write_midi(composed.song, out / f"{stem}.generated.mid")
        write_midi(window.song, out / f"{stem}.real.mid")
        (out / f"{stem}.generated.json").write_text(json.dumps(
            {"request": {"form": window.request.form, "key": window.request.key, "metre": window.request.metre,
                         "tempo": window.request.tempo, "seed": window.request.seed},
             "stages": composed.stages}, indent=1))


def _plots(run: RunDir, out: EvalDir, windows: list[Window], generated: list[Composed]) -> dict:
    """Each plot's path (relative to the report's folder), or why it was skipped."""
    from musicray.eval import plots

    song, real = generated[0].song, windows[0].song
    jobs = {
        "piano_roll_generated": lambda p: plots.piano_roll(
            song, p, f"generated: form {song.form}, {song.key}, {song.metre} (as test song {windows[0].source_id})"),
        "piano_roll_real": lambda p: plots.piano_roll(real, p, f"real: test song {windows[0].source_id}, form "
                                                              f"{real.form}, {real.key}, {real.metre}"),
        "performance_curves": lambda p: plots.performance_curves(song, real, p),
        "training_curves": lambda p: plots.training_curves(run.stage1_metrics, p),
        "sweep_table": lambda p: plots.sweep_table(run.trials_csv, p),
    }
    result = {}
    for name, draw in jobs.items():
        try:
            result[name] = str(draw(out.plot(name)).relative_to(out.root))
        except (FileNotFoundError, ValueError) as err:
            result[name] = f"skipped: {err}"
    return result
