"""The evaluation's figures from what it composed and scored: song and stream measures over generated and real songs,
and the ablation table (``musicray.eval.report`` runs the evaluation and gathers them; ``musicray.eval.markdown``
renders them)."""

from __future__ import annotations

from pathlib import Path

from musicray.encoding import encode
from musicray.eval import metrics as m
from musicray.eval.generation import Composed, StageStream, Window
from musicray.eval.structure import DEFINITIONS as STRUCTURE_DEFINITIONS
from musicray.eval.structure import song_structure_measures
from musicray.eval.teacher_forced import Scores
from musicray.grammar import Grammar, Plan
from musicray.run import ABLATIONS
from musicray.song import Song
from musicray.streams import TASK_TARGET
from musicray.tokens import SUBTASKS, Vocabulary

ABLATIONS_DIR = ABLATIONS
# Song metrics shown in the ablation table (the rest are in the generated-vs-real table).
ABLATION_SONG_METRICS = ("chord_tone_ratio", "pitch_class_entropy_h4", "groove_consistency")
# The evaluation's variants: the same windows composed again with one setting changed (musicray.eval.report),
# each label's rows in the ablation table: (ablation, the main composition's variant, this one's).
TEMPERATURE_ONE = "temperature 1"
GUARD_OFF = "harmony guard off"
VARIANT_ROWS: dict[str, tuple[str, str, str]] = {
    TEMPERATURE_ONE: ("sampling", "the run's eval.sampling", "every stage at temperature 1"),
    GUARD_OFF: ("harmony guard", "on", "off"),
}
# Structure-and-key measures (musicray.eval.structure) shown in the ablation table: what the harmony guard and the
# variation act on.
ABLATION_STRUCTURE_MEASURES = ("scale_consistency_melody", "chord_time_in_scale", "same_label_similarity")
# The relation figures (``musicray.eval.relations``) shown in the language ablation's rows.
RELATION_COLUMNS = ("chord_tone_mass", "scale_mass", "tempo_hold")


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


def generated_vs_real(generated: list[Composed], windows: list[Window], test_songs: list[Song],
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


def add_language_ablation(ablations: dict, generated_plain: list[Composed], relations: dict, contrast: str,
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
        "dir": arm["dir"], "language": arm["language"], "songs": composed_summary(arm["generated"]),
        "relations": arm["relations"]}}
    ablations["columns"].update({
        "chord_tone_mass": "teacher-forced probability mass on the sounding chord's tones at melody pitch positions "
                           "(reference row: the real notes' share)",
        "scale_mass": "teacher-forced probability mass on the key's scale at melody pitch positions",
        "tempo_hold": "teacher-forced probability of keeping the previous bar's tempo at tempo positions"})


def _structure_means(songs: list[Song]) -> dict:
    """The mean over songs of each of ``ABLATION_STRUCTURE_MEASURES`` (songs where it is undefined left out)."""
    per_song = [song_structure_measures(song) for song in songs]
    means = {}
    for key in ABLATION_STRUCTURE_MEASURES:
        values = [song[key] for song in per_song if song[key] is not None]
        means[key] = sum(values) / len(values) if values else None
    return means


def ablation_figures(generated, unmasked, generated_plain, stages, stages_plain, tf_adapter, tf_alone, main_mask_loss,
                     loss_arm, real_windows, vocab, variants: dict[str, list[Composed]] | None = None) -> dict:
    """The ablations, and their rows in one table. ``variants``: the same windows composed with one setting changed
    (``musicray.eval.report``'s labels), each a row beside the main composition."""
    variants = variants or {}

    def song_figures(composed: list[Composed]) -> dict:
        if not composed:
            return {}
        valid = [c.song for c in composed if c.song is not None]
        summary = summarize_songs(valid) if valid else {}
        return {"songs_valid": sum(c.song is not None for c in composed) / len(composed),
                **{key: summary.get(key, {}).get("mean") for key in ABLATION_SONG_METRICS},
                **_structure_means(valid)}

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
    for label, composed in variants.items():
        ablation, main_variant, variant = VARIANT_ROWS[label]
        rows += [{"ablation": ablation, "variant": f"{main_variant} (adapters, mask on)", **song_figures(generated)},
                 {"ablation": ablation, "variant": variant, **song_figures(composed)}]
    rows += [
        {"ablation": "LoRA adapters", "variant": "adapters (mask on)", **song_figures(generated),
         **tf_figures(adapters_effective)},
        {"ablation": "LoRA adapters", "variant": "stage-1 alone (mask on)", **song_figures(generated_plain),
         **tf_figures(tf_alone)},
        {"ablation": "reference", "variant": "real test windows",
         **{key: summarize_songs(real_windows)[key]["mean"] for key in ABLATION_SONG_METRICS},
         **_structure_means(real_windows)},
    ]
    return {
        "generation_mask": {
            "on": {"songs": composed_summary(generated), "stages": summarize_streams(stages[True], vocab)},
            "off": {"songs": composed_summary(unmasked), "stages": summarize_streams(stages[False], vocab)},
        },
        "variants": {label: {"songs": composed_summary(composed), **song_figures(composed)}
                     for label, composed in variants.items()},
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
            **{key: STRUCTURE_DEFINITIONS[key] for key in ABLATION_STRUCTURE_MEASURES},
        },
    }


def composed_summary(composed: list[Composed]) -> dict:
    failed: dict[str, int] = {}
    for c in composed:
        if c.failed_stage:
            failed[c.failed_stage] = failed.get(c.failed_stage, 0) + 1
    return {"valid": sum(c.song is not None for c in composed), "total": len(composed), "failed_at": failed,
            "errors": [c.error for c in composed if c.error],
            "seconds_per_song": sum(c.seconds for c in composed) / len(composed) if composed else None}
