"""``report.md``: the evaluation's report (``musicray.eval.report``'s ``report.json``) rendered as markdown tables,
with links to the plots."""

from __future__ import annotations

from musicray.eval.figures import ABLATION_SONG_METRICS, ABLATION_STRUCTURE_MEASURES, RELATION_COLUMNS

MISSING = "–"


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
    variants = list(structure.get("variants", {}))

    def variant_cells(row: dict) -> list[str]:
        cells = []
        for label in variants:
            entry = row["variants"][label]
            cells.append(_interval(entry["interval"]) + ("" if entry["met"] is None else f" ({_fmt(entry['met'])})"))
        return cells

    lines += _table(["measure", "generated", *[f"generated, {label} (met)" for label in variants],
                     "real (same forms)", *(["real test songs"] if has_whole else []), "goal", "met"],
                    [[row["measure"], _interval(row["generated"]), *variant_cells(row), _interval(row["real"]),
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
    for label, accuracy in structure.get("variants", {}).items():
        lines.append(f"- real vs generated, {label}: cross-validated accuracy {_fmt(accuracy)}")
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
               "after the first (tempo sub-task), its probability of keeping the previous bar's tempo; at each chord "
               "(chord sub-task), the share of its chord probability on chords whose tones are all in the key's "
               "scale. 'real': the same share for the true next tokens."), ""]
    lines += _table(["relation", "model", "real", "positions"], [
        ["on chord tones", _fmt(relations["chord_tone_mass"]), _fmt(relations["real_chord_tone"]),
         relations["pitch_positions"]],
        ["in the key's scale", _fmt(relations["scale_mass"]), _fmt(relations["real_in_scale"]),
         relations["pitch_positions"]],
        ["tempo held", _fmt(relations["tempo_hold"]), _fmt(relations["real_tempo_hold"]),
         relations["tempo_positions"]],
        ["chords in the key's scale", _fmt(relations.get("diatonic_chord_mass")),
         _fmt(relations.get("real_diatonic_chord")), relations.get("chord_positions", 0)]])
    if relations.get("copy_positions"):
        lines += ["", f"Returns (melody sub-task, test windows of up to 16 bars, or the run's own if longer): of "
                  f"{relations['returning_bars']} bars of returning sections, {relations['copyable_bars']} repeat "
                  "their first occurrence token for token. The model's probability of the real token inside them: "
                  f"{_fmt(relations['return_copy_p'])}; inside their first occurrences, where nothing earlier says "
                  f"what comes: {_fmt(relations['return_first_p'])}. A model that reads a return off its first "
                  "occurrence gives the returning bars far more."]

    ablations = report["ablations"]
    columns = ["songs_valid", "stages_valid", "structure_adherence", "loss", "accuracy", "masked_loss",
               "masked_accuracy", *ABLATION_SONG_METRICS, *ABLATION_STRUCTURE_MEASURES, *RELATION_COLUMNS]
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
