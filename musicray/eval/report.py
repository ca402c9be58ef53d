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
   real-vs-generated classifier;
5. plots (``musicray.eval.plots``): piano rolls, velocity and tempo curves against the real window, the stage-1
   training curves, the stage-2 sweep table.

It writes ``report.json`` (every figure), ``report.md`` (the tables, with links to the plots), ``plots/*.png``
and the generated and real windows as MIDI in ``songs/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import time
from pathlib import Path

import torch

from musicray.data.layout import DataDir
from musicray.encoding import TASK_TARGET, encode
from musicray.eval import metrics as m
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
from musicray.eval.relations import relation_scores
from musicray.eval.structure import SOURCES as STRUCTURE_SOURCES
from musicray.eval.structure import structure_report
from musicray.eval.teacher_forced import Scores, held_out_dataset, teacher_forced
from musicray.grammar import Grammar, Plan
from musicray.run import ABLATIONS, EvalDir, RunDir
from musicray.sampling import Sampling, stage_sampling
from musicray.song import Song, SongError
from musicray.tokens import SUBTASKS, Vocabulary
from musicray.train.config import Config, EvalConfig, load_config

ABLATIONS_DIR = ABLATIONS
MISSING = "–"
SOURCES = (
    ("Wu, S.-L. & Yang, Y.-H. (2020). The Jazz Transformer on the Front Line: Exploring the Shortcomings of "
     "AI-composed Music through Quantitative Measures. ISMIR 2020; code: github.com/slSeanWU/MusDr "
     "(pitch-class entropy H, grooving pattern similarity GS)."),
    ("Yeh, Y.-C. et al. (2021). Automatic melody harmonization with triad chords: A comparative study. "
     "Journal of New Music Research 50(1) (chord tones n_c, non-chord tones n_n, CTnCTR)."),
    ("Chu (NCU, 2025). Music Generation with Structure Control and Performance Expression via Pretrained LLaMA "
     "Model (structure control, the grammar mask, the ablations)."),
)
# Song metrics shown in the ablation table (the rest are in the generated-vs-real table).
ABLATION_SONG_METRICS = ("chord_tone_ratio", "pitch_class_entropy_h4", "groove_consistency")


def check_inputs(run_dir: Path, data_dir: Path) -> None:
    """One-line errors for a run or data dir that cannot be evaluated."""
    if not Path(run_dir).is_dir():
        raise SongError(f"--run: {run_dir} does not exist")
    RunDir(run_dir).require("stage-1 model")
    if not DataDir(data_dir).is_prepared():
        raise SongError(f"--data: {data_dir} is not a prepared data dir (no {DataDir(data_dir).songs.name}); run "
                        "`musicray data prepare` or `musicray data synth`, or pass the data dir the run was trained on")


def run_config(run_dir: Path) -> Config:
    """The configuration the run's stage 1 was trained with (the defaults where the run has none)."""
    saved = RunDir(run_dir).stage1_config
    return load_config(saved if saved.exists() else None)


def settings_for(run_dir: str | Path, **overrides) -> EvalConfig:
    """The run config's ``eval`` settings with the ``overrides`` that are not None (command-line flags)."""
    return dataclasses.replace(run_config(Path(run_dir)).eval,
                               **{name: value for name, value in overrides.items() if value is not None})


# -- measures over generated and real songs ------------------------------------------------------------------

def _stream_measures(streams: list[tuple[list[int], str, Plan]], grammar: Grammar) -> dict:
    """Grammar validity and structure adherence of (tokens, stream, plan) triples."""
    if not streams:
        return {"grammar_validity": None, "structure_adherence": None, "streams": 0}
    errors = grammar.validate_batch([s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams])
    adherence = [m.structure_adherence(tokens, grammar.vocab, plan.sections) for tokens, _, plan in streams]
    return {"grammar_validity": m.grammar_validity(errors), "structure_adherence": sum(adherence) / len(adherence),
            "streams": len(streams)}


def real_streams(song: Song, vocab: Vocabulary) -> list[tuple[list[int], str, Plan]]:
    """The five sub-task streams of a real song, as the composer's stages would have to write them."""
    out = []
    for task in SUBTASKS:
        example = encode(song, task, vocab)
        out.append((example.target, TASK_TARGET[task], Plan.from_prompt(example.prompt, vocab)))
    return out


def composed_streams(composed: list[Composed], vocab: Vocabulary) -> list[tuple[list[int], str, Plan]]:
    """The streams the composer's stages wrote (as each stage's report keeps them), with the plan each stage ran
    under: the plan of the stage's prompt, which the finished song reproduces (later stages change no note)."""
    out = []
    for result in composed:
        for task, info in result.stages.items():
            plan = Plan.from_prompt(encode(result.song, task, vocab).prompt, vocab)
            out.append((vocab.parse(info["tokens"]), TASK_TARGET[task], plan))
    return out


def summarize_songs(songs: list[Song]) -> dict[str, dict]:
    """Mean, std and count of every song metric over the songs."""
    per_song = [m.song_metrics(song) for song in songs]
    return {key: m.mean_of([values[key] for values in per_song]) for key in (per_song[0] if per_song else {})}


def summarize_streams(streams: list[StageStream], vocab: Vocabulary) -> dict:
    """Validity, structure adherence and finished share of single-stage generations, overall and per stage."""
    if not streams:
        return {"grammar_validity": None, "structure_adherence": None, "finished": None, "streams": 0}
    by_task: dict[str, list[StageStream]] = {}
    for stream in streams:
        by_task.setdefault(stream.task, []).append(stream)

    def figures(group: list[StageStream]) -> dict:
        return {"grammar_validity": m.grammar_validity([s.errors for s in group]),
                "structure_adherence": sum(m.structure_adherence(s.tokens, vocab, s.plan.sections) for s in group)
                / len(group),
                "finished": sum(s.finished for s in group) / len(group), "streams": len(group),
                "first_errors": [str(s.errors[0]) if s.errors else None for s in group]}

    overall = figures(streams)
    overall.pop("first_errors")
    return {**overall, "per_stage": {task: figures(group) for task, group in by_task.items()}}


def _macro(scores: dict[str, Scores | None], field: str) -> float | None:
    values = [getattr(s, field) for s in scores.values() if s is not None]
    return sum(values) / len(values) if values else None


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


def _relations(composer, data_dir: Path, settings: EvalConfig, config: Config) -> dict:
    """Teacher-forced relation scores (``musicray.eval.relations``) of the melody and tempo sub-tasks, each
    under its adapter where it has one, on the same test examples as the teacher-forced scores."""
    datasets = {task: held_out_dataset(data_dir, task, composer.music, config.data.max_length, config.data.max_bars,
                                       settings.max_examples or None) for task in ("melody", "tempo")}
    with composer.use_adapter("melody"):
        melody = relation_scores(composer.model, composer.music, datasets["melody"], None, settings.batch_size)
    with composer.use_adapter("tempo"):
        tempo = relation_scores(composer.model, composer.music, None, datasets["tempo"], settings.batch_size)
    return {"language": composer.music.vocab.config.language,
            "chord_tone_mass": melody.chord_tone_mass, "real_chord_tone": melody.real_chord_tone,
            "scale_mass": melody.scale_mass, "real_in_scale": melody.real_in_scale,
            "tempo_hold": tempo.tempo_hold, "real_tempo_hold": tempo.real_tempo_hold,
            "pitch_positions": melody.pitch_positions, "tempo_positions": tempo.tempo_positions}


def evaluate_run(run_dir: str | Path, data_dir: str | Path, out_dir: str | Path, settings: EvalConfig | None = None,
                 device: str | None = None, progress: bool = True) -> dict:
    """Evaluate a run on the test split of ``data_dir``; write the report into ``out_dir``; return report.json's
    contents."""
    from musicray.compose import Composer

    run_dir, data_dir, out_dir = (Path(p).expanduser().resolve() for p in (run_dir, data_dir, out_dir))
    check_inputs(run_dir, data_dir)
    config = run_config(run_dir)
    settings = settings or config.eval
    dataclasses.replace(config, eval=settings).validate()   # the same bounds as a config file's eval: section
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    log = (lambda text: print(text, flush=True)) if progress else (lambda text: None)
    clock = _Clock(log)
    out_dir.mkdir(parents=True, exist_ok=True)

    test_songs = split_songs(data_dir)
    composer = Composer(run_dir, device)
    vocab, grammar = composer.music.vocab, composer.grammar
    windows = eval_windows(test_songs, settings.songs, settings.max_bars, vocab, settings.seed,
                           stage_sampling(settings.sampling, Sampling(), "eval.sampling"), settings.window,
                           settings.variation)
    notes = _setup_notes(settings, config, windows, composer.adapters)
    with clock.part(f"compose {len(windows)} windows (mask on, adapters, batched)"):
        generated = compose_batch(composer, [w.request for w in windows])
    with clock.part("compose (mask off, adapters, one at a time)"):
        unmasked = compose_each(composer, [dataclasses.replace(w.request, use_mask=False) for w in windows])
    with clock.part("single stages from the real inputs (mask on and off)"):
        stages = {use_mask: [s for task in SUBTASKS for s in stage_streams(composer, windows, task, use_mask)]
                  for use_mask in (True, False)}
    with clock.part("teacher-forced scores (adapters, stage-1 alone)"):
        tf_adapter, tf_alone = _teacher_forced_all(composer, data_dir, settings, config, True)
    with clock.part("relations (chord tones, key, tempo hold)"):
        relations = _relations(composer, data_dir, settings, config)
    del composer

    plain = Composer(run_dir, device, adapters=())
    with clock.part("compose (mask on, stage-1 alone)"):
        generated_plain = compose_batch(plain, [w.request for w in windows])
    with clock.part("single stages, mask off, stage-1 alone"):
        stages_plain = [s for task in SUBTASKS for s in stage_streams(plain, windows, task, use_mask=False)]
    with clock.part("relations, stage-1 alone (the language ablation's row)"):
        relations_plain = _relations(plain, data_dir, settings, config)
    del plain

    main_mask_loss = config.stage1.mask_loss
    other_arm = RunDir(run_dir).ablation(not main_mask_loss)
    other_dir = other_arm.root
    loss_arm: dict | None = None
    if other_arm.has_model():
        arm = Composer(other_dir, device, adapters=())
        with clock.part(f"loss-mask ablation (stage1.mask_loss={str(not main_mask_loss).lower()})"):
            _, arm_tf = _teacher_forced_all(arm, data_dir, settings, config, False)
            arm_stages = [s for task in SUBTASKS for s in stage_streams(arm, windows, task, use_mask=False)]
        loss_arm = {"dir": str(other_dir), "teacher_forced": arm_tf, "stages": arm_stages}
        del arm
    else:
        notes.append(f"loss-mask ablation not run: no stage-1 model in {other_dir} (the pipeline trains it when "
                     "eval.mask_loss_ablation is true)")

    contrast = config.vocab.contrast().language
    language_run = RunDir(run_dir).language_ablation(contrast)
    arm_dir = language_run.root
    language_arm: dict | None = None
    if language_run.has_model():
        arm = Composer(arm_dir, device, adapters=())
        with clock.part(f"language ablation (stage 1 in the {contrast} language)"):
            language_arm = {"dir": str(arm_dir), "language": contrast,
                            "generated": compose_batch(arm, [w.request for w in windows]),
                            "relations": _relations(arm, data_dir, settings, config)}
        del arm
    else:
        notes.append(f"language ablation not run: no stage-1 model in {arm_dir} (the pipeline trains it when "
                     "eval.language_ablation is true)")

    report_dir = EvalDir(out_dir)
    report_dir.songs.mkdir(exist_ok=True)
    _write_songs(windows, generated, report_dir.songs)

    with clock.part("plots"):
        plots = _plots(RunDir(run_dir), report_dir, windows, generated)

    with clock.part("metrics of the generated and real songs"):
        metrics = _generated_vs_real(generated, windows, test_songs, grammar)
        ablations = _ablations(generated, unmasked, generated_plain, stages, stages_plain, tf_adapter, tf_alone,
                               main_mask_loss, loss_arm, [w.song for w in windows], vocab)
        _add_language_ablation(ablations, generated_plain, relations_plain, contrast, language_arm)
    with clock.part("structure and key (MusPy, bootstrap intervals, real-vs-generated classifier)"):
        structure = structure_report([c.song for c in generated if c.song is not None], [w.song for w in windows],
                                     test_songs, seed=settings.seed)
    report = {
        "run_dir": str(run_dir), "data_dir": str(data_dir), "device": device,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(settings),
        "notes": notes,
        "windows": [{"source_song": w.source_id, "form": w.song.form, "key": w.song.key, "metre": w.song.metre,
                     "tempo": w.request.tempo, "seed": w.request.seed, "cut": w.cut} for w in windows],
        "metrics": metrics,
        "structure": structure,
        "teacher_forced": {task: {"adapter": tf_adapter[task].to_dict() if tf_adapter[task] else None,
                                  "stage1": tf_alone[task].to_dict()} for task in SUBTASKS},
        "ablations": ablations,
        "relations": relations,
        "plots": plots,
        "seconds": {**clock.seconds, "total": round(time.perf_counter() - clock.started, 2)},
        "sources": [*SOURCES, *STRUCTURE_SOURCES],
    }
    report_dir.report_json.write_text(json.dumps(report, indent=1))
    report_dir.report_md.write_text(render_markdown(report))
    log(f"   wrote {report_dir.report_md} and {report_dir.report_json.name}")
    return report


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


def _generated_vs_real(generated: list[Composed], windows: list[Window], test_songs: list[Song],
                       grammar: Grammar) -> dict:
    """Every song metric over the generated songs, the same real windows and the whole real test songs."""
    vocab = grammar.vocab
    real_windows = [w.song for w in windows]

    def streams_of(songs: list[Song]) -> dict:
        return _as_means(_stream_measures([s for song in songs for s in real_streams(song, vocab)], grammar))

    return {
        "definitions": m.DEFINITIONS,
        "songs": {"generated": len(generated), "real_windows": len(windows), "real_test_songs": len(test_songs)},
        "generated": {**summarize_songs([c.song for c in generated]),
                      **_as_means(_stream_measures(composed_streams(generated, vocab), grammar))},
        "real_windows": {**summarize_songs(real_windows), **streams_of(real_windows)},
        "real_test_songs": {**summarize_songs(test_songs), **streams_of(test_songs)},
        "per_window": [{"source_song": w.source_id, "generated": m.song_metrics(c.song),
                        "real": m.song_metrics(w.song)} for w, c in zip(windows, generated)],
    }


def _as_means(figures: dict) -> dict:
    """Stream figures in the shape of summarize_songs' entries (one value over all streams)."""
    n = figures["streams"]
    return {key: {"mean": figures[key], "std": None, "n": n} for key in ("structure_adherence", "grammar_validity")}


# The relation figures (``musicray.eval.relations``) shown in the language ablation's rows.
RELATION_COLUMNS = ("chord_tone_mass", "scale_mass", "tempo_hold")


def _add_language_ablation(ablations: dict, generated_plain: list[Composed], relations: dict, contrast: str,
                           arm: dict | None) -> None:
    """The relative-vs-absolute rows: the run's stage 1 alone against the same stage 1 trained in the contrasting
    language (both composing the same windows with the mask on, no adapters), put before the reference row, and
    the ``language`` entry of the ablations."""

    def row(variant: str, composed: list[Composed], figures: dict) -> dict:
        valid = [c.song for c in composed if c.song is not None]
        chord_tone = summarize_songs(valid)["chord_tone_ratio"]["mean"] if valid else None
        return {"ablation": "music language", "variant": variant,
                "songs_valid": sum(c.song is not None for c in composed) / len(composed),
                "chord_tone_ratio": chord_tone, **{key: figures.get(key) for key in RELATION_COLUMNS}}

    rows = [row(f"{relations['language']} (the run's stage 1 alone)", generated_plain, relations)]
    rows.append({"ablation": "music language", "variant": f"{contrast}: not run"} if arm is None else
                row(f"{contrast} ({ABLATIONS_DIR}/{Path(arm['dir']).name})", arm["generated"], arm["relations"]))
    table = ablations["table"]
    at = next(i for i, r in enumerate(table) if r["ablation"] == "reference")
    table[at:at] = rows
    table[-1].update({"chord_tone_mass": relations.get("real_chord_tone"), "scale_mass": relations.get("real_in_scale"),
                      "tempo_hold": relations.get("real_tempo_hold")})
    ablations["language"] = {"run": rows[0], "other": "not run" if arm is None else {
        "dir": arm["dir"], "language": arm["language"], "songs": _composed_summary(arm["generated"]),
        "relations": arm["relations"]}}
    ablations["columns"].update({
        "chord_tone_mass": "teacher-forced probability mass on the sounding chord's tones at melody pitch positions "
                           "(reference row: the real notes' share)",
        "scale_mass": "teacher-forced probability mass on the key's scale at melody pitch positions",
        "tempo_hold": "teacher-forced probability of keeping the previous bar's tempo at tempo positions"})


def _ablations(generated, unmasked, generated_plain, stages, stages_plain, tf_adapter, tf_alone, main_mask_loss,
               loss_arm, real_windows, vocab) -> dict:
    """The three ablations, and their rows in one table."""

    def song_figures(composed: list[Composed]) -> dict:
        valid = [c.song for c in composed if c.song is not None]
        summary = summarize_songs(valid) if valid else {}
        return {"songs_valid": sum(c.song is not None for c in composed) / len(composed),
                **{key: summary.get(key, {}).get("mean") for key in ABLATION_SONG_METRICS}}

    def tf_figures(scores: dict) -> dict:
        return {field: _macro(scores, field) for field in ("loss", "accuracy", "masked_loss", "masked_accuracy")}

    def stream_figures(streams: list[StageStream]) -> dict:
        summary = summarize_streams(streams, vocab)
        return {"stages_valid": summary["grammar_validity"], "structure_adherence": summary["structure_adherence"]}

    adapters_effective = {task: tf_adapter[task] or tf_alone[task] for task in SUBTASKS}
    rows = [
        {"ablation": "generation mask", "variant": "on (adapters)", **song_figures(generated),
         **stream_figures(stages[True])},
        {"ablation": "generation mask", "variant": "off (adapters)", **song_figures(unmasked),
         **stream_figures(stages[False])},
        {"ablation": "mask in the stage-1 loss", "variant": f"{'on' if main_mask_loss else 'off'} (the run's stage 1)",
         **tf_figures(tf_alone), **stream_figures(stages_plain)},
    ]
    other = "off" if main_mask_loss else "on"
    if loss_arm is None:
        rows.append({"ablation": "mask in the stage-1 loss", "variant": f"{other}: not run"})
    else:
        rows.append({"ablation": "mask in the stage-1 loss", "variant": f"{other} ({ABLATIONS_DIR}/{Path(loss_arm['dir']).name})",
                     **tf_figures(loss_arm["teacher_forced"]), **stream_figures(loss_arm["stages"])})
    rows += [
        {"ablation": "LoRA adapters", "variant": "adapters (mask on)", **song_figures(generated),
         **tf_figures(adapters_effective)},
        {"ablation": "LoRA adapters", "variant": "stage-1 alone (mask on)", **song_figures(generated_plain),
         **tf_figures(tf_alone)},
        {"ablation": "reference", "variant": "real test windows",
         **{key: summarize_songs(real_windows)[key]["mean"] for key in ABLATION_SONG_METRICS}},
    ]
    return {
        "generation_mask": {
            "on": {"songs": _composed_summary(generated), "stages": summarize_streams(stages[True], vocab)},
            "off": {"songs": _composed_summary(unmasked), "stages": summarize_streams(stages[False], vocab)},
        },
        "loss_mask": {
            "run": {"mask_loss": main_mask_loss, "teacher_forced": {t: s.to_dict() for t, s in tf_alone.items()},
                    "stages_unmasked": summarize_streams(stages_plain, vocab)},
            "other": "not run" if loss_arm is None else {
                "mask_loss": not main_mask_loss, "dir": loss_arm["dir"],
                "teacher_forced": {t: s.to_dict() for t, s in loss_arm["teacher_forced"].items()},
                "stages_unmasked": summarize_streams(loss_arm["stages"], vocab)},
        },
        "adapters": {"with": song_figures(generated), "stage1_alone": song_figures(generated_plain)},
        "table": rows,
        "columns": {
            "songs_valid": "share of windows composed through all five stages without an ungrammatical stream",
            "stages_valid": "share of single-stage generations (real inputs, every stage) the grammar accepts",
            "structure_adherence": "sections written as requested, mean over those single-stage generations",
            "loss / accuracy": "teacher-forced on the test split, mean over the five sub-tasks (stage-1 alone for "
                               "the loss-mask rows); (grammar): under the grammar's allowed-token mask",
            **{key: m.DEFINITIONS[key] for key in ABLATION_SONG_METRICS},
        },
    }


def _composed_summary(composed: list[Composed]) -> dict:
    failed: dict[str, int] = {}
    for c in composed:
        if c.failed_stage:
            failed[c.failed_stage] = failed.get(c.failed_stage, 0) + 1
    return {"valid": sum(c.song is not None for c in composed), "total": len(composed), "failed_at": failed,
            "errors": [c.error for c in composed if c.error],
            "seconds_per_song": sum(c.seconds for c in composed) / len(composed)}


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


# -- report.md -----------------------------------------------------------------------------------------------

def _interval(entry: dict | None) -> str:
    """``mean [low, high] (n)`` of a ``structure.Interval`` as a dict."""
    if not entry:
        return MISSING
    spread = f" [{_fmt(entry['low'])}, {_fmt(entry['high'])}]" if entry["low"] is not None else ""
    return f"{_fmt(entry['mean'])}{spread} (n={entry['n']})"


def _structure_markdown(structure: dict) -> list[str]:
    """The "Structure and key" section: every measure of ``musicray.eval.structure`` with its interval on each
    side, the goal and whether the generated songs meet it, and the real-vs-generated classifier."""
    confidence = f"{structure['confidence']:.0%}"
    lines = ["", "## Structure and key", "",
             (f"Mean [{confidence} bootstrap interval over songs, {structure['resamples']} resamples, seed "
              f"{structure['seed']}] (songs where the measure is defined). Generated: the composed songs above; "
              "real (same forms): the same windows of the real songs; real test songs: the whole test songs, "
              "for reference. A goal is met only when the generated songs' whole interval clears it; a pitch-range "
              "goal is within 25 % of the real songs of the same forms."), ""]
    has_whole = any("real_songs" in row for row in structure["rows"])
    lines += _table(["measure", "generated", "real (same forms)", *(["real test songs"] if has_whole else []),
                     "goal", "met"],
                    [[row["measure"], _interval(row["generated"]), _interval(row["real"]),
                      *([_interval(row.get("real_songs"))] if has_whole else []),
                      row["goal"] or MISSING, _fmt(row["met"])] for row in structure["rows"]])
    classifier = structure["classifier"]
    lines.append("")
    if classifier["accuracy"] is None:
        lines.append(f"- real vs generated: not computed ({classifier['reason']})")
    else:
        giveaways = ", ".join(f"{key} ({weight:+.2f})" for key, weight in list(classifier["coefficients"].items())[:5])
        lines.append(f"- **real vs generated**: a logistic regression on these per-song measures tells the "
                     f"{classifier['generated_songs']} generated songs from the {classifier['real_songs']} real ones "
                     f"with a {classifier['folds']}-fold cross-validated accuracy of {_fmt(classifier['accuracy'])} "
                     "(0.5: indistinguishable by these measures); the measures that give them away, standardised "
                     f"coefficient (+: more in the generated songs): {giveaways}")
    lines += [f"- **{key}**: {text}" for key, text in structure["definitions"].items()]
    return lines


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _stat(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return MISSING
    text = _fmt(entry["mean"])
    if entry.get("std") is not None and entry.get("n", 0) > 1:
        text += f" ± {_fmt(entry['std'])}"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def render_markdown(report: dict) -> str:
    metrics = report["metrics"]
    lines = ["# musicray evaluation", "",
             (f"Run `{report['run_dir']}`, data `{report['data_dir']}` (test split), {report['created']}, "
              f"{report['device']}, {report['seconds']['total']} s."), ""]
    lines += [f"- {note}" for note in report["notes"]] + [""]

    lines += ["## Windows composed", ""]
    lines += _table(["test song", "form", "key", "metre", "tempo", "seed", "section cut"],
                    [[w["source_song"], w["form"], w["key"], w["metre"], w["tempo"], w["seed"], _fmt(w["cut"])]
                     for w in report["windows"]])

    lines += ["", "## Generated vs real", "",
              ("Mean ± std over songs. Generated: the composer (adapters, grammar mask on) on the windows above; "
               "real windows: the same windows of the real songs; real test songs: the "
               f"{metrics['songs']['real_test_songs']} whole test songs. Structure adherence and grammar validity "
               "are over the five stage streams of every song."), ""]
    keys = list(metrics["generated"])
    lines += _table(["metric", "generated", "real windows", "real test songs", "definition"],
                    [[key, _stat(metrics["generated"].get(key)), _stat(metrics["real_windows"].get(key)),
                      _stat(metrics["real_test_songs"].get(key)), metrics["definitions"].get(key, "")]
                     for key in keys])

    if "structure" in report:
        lines += _structure_markdown(report["structure"])

    lines += ["", "## Teacher-forced scores (test split)", "",
              ("Loss: cross-entropy per answer token (nats); accuracy: argmax == next answer token. '(grammar)': "
               "renormalised over / argmax among the tokens the grammar allows (the thesis' loss mask)."), ""]
    rows = []
    for task, entry in report["teacher_forced"].items():
        for label, scores in (("adapter", entry["adapter"]), ("stage-1 alone", entry["stage1"])):
            if scores is None:
                rows.append([task, label, MISSING, MISSING, MISSING, MISSING, MISSING, MISSING])
                continue
            rows.append([task, label, scores["examples"], scores["tokens"], _fmt(scores["loss"]),
                         _fmt(scores["accuracy"]), _fmt(scores["masked_loss"]), _fmt(scores["masked_accuracy"])])
    lines += _table(["sub-task", "model", "examples", "tokens", "loss", "accuracy", "loss (grammar)",
                     "accuracy (grammar)"], rows)

    relations = report["relations"]
    lines += ["", "## Relations the model learnt (teacher-forced, test split)", "",
              (f"Language: {relations['language']}. At each MELODY pitch the model predicts (melody sub-task), the "
               "share of its pitch probability on the sounding chord's tones and on the key's scale; at each bar "
               "after the first (tempo sub-task), its probability of keeping the previous bar's tempo. 'real': the "
               "same share for the true next tokens."), ""]
    lines += _table(["relation", "model", "real", "positions"], [
        ["on chord tones", _fmt(relations["chord_tone_mass"]), _fmt(relations["real_chord_tone"]),
         relations["pitch_positions"]],
        ["in the key's scale", _fmt(relations["scale_mass"]), _fmt(relations["real_in_scale"]),
         relations["pitch_positions"]],
        ["tempo held", _fmt(relations["tempo_hold"]), _fmt(relations["real_tempo_hold"]),
         relations["tempo_positions"]]])

    ablations = report["ablations"]
    columns = ["songs_valid", "stages_valid", "structure_adherence", "loss", "accuracy", "masked_loss",
               "masked_accuracy", *ABLATION_SONG_METRICS, *RELATION_COLUMNS]
    lines += ["", "## Ablations", ""]
    lines += _table(["ablation", "variant", *[c.replace("masked_", "") + (" (grammar)" if c.startswith("masked_")
                                                                            else "") for c in columns]],
                    [[row["ablation"], row["variant"], *[_fmt(row.get(c)) for c in columns]]
                     for row in ablations["table"]])
    lines += [""] + [f"- **{name}**: {text}" for name, text in ablations["columns"].items()]
    mask_off = ablations["generation_mask"]["off"]["songs"]
    if mask_off["failed_at"]:
        lines.append("- without the mask, composing stopped at the first stage whose output was ungrammatical: "
                     + ", ".join(f"{task} ({n} song{'s' if n != 1 else ''})" for task, n in
                                 mask_off["failed_at"].items()))

    lines += ["", "## Plots", ""]
    for name, path in report["plots"].items():
        if path.startswith("skipped"):
            lines.append(f"- {name}: {path}")
        else:
            lines.append(f"- [{name}]({path})\n\n  ![{name}]({path})")
    lines += ["", "## Seconds", ""]
    lines += _table(["part", "s"], [[name, seconds] for name, seconds in report["seconds"].items()])
    lines += ["", "## Sources", ""] + [f"- {source}" for source in report["sources"]] + [""]
    return "\n".join(lines)
