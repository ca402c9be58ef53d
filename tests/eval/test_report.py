"""``musicray eval`` end to end on a tiny random-weight run: report.json, report.md, the ablation table, plots."""

import json
import shutil

import pytest

from musicray.cli import main
from musicray.eval.report import evaluate_run, settings_for
from musicray.run import EvalDir, RunDir
from musicray.tokens import SUBTASKS
from musicray.train.config import EvalConfig

from .conftest import ADAPTED, TRAIN_SONGS, write_data

SMALL = EvalConfig(songs=2, max_bars=2, max_examples=6, batch_size=3, seed=5)
PLOTS = ("piano_roll_generated", "piano_roll_real", "performance_curves", "training_curves", "sweep_table")


@pytest.fixture(scope="module")
def report_dir(eval_run, eval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    evaluate_run(eval_run, eval_data, out, SMALL, progress=False)
    return out


@pytest.fixture(scope="module")
def report(report_dir):
    return json.loads(EvalDir(report_dir).report_json.read_text())


def test_report_json_has_every_part(report):
    assert {"run_dir", "data_dir", "settings", "notes", "windows", "metrics", "teacher_forced", "ablations", "plots",
            "seconds", "sources"} <= set(report)
    assert report["settings"]["songs"] == 2 and len(report["windows"]) == 2
    assert all(int(w["form"][1:]) <= 2 for w in report["windows"])   # 8-bar sections cut to 2-bar windows
    assert any("at most 2 bars" in note for note in report["notes"])


def test_generated_songs_are_compared_with_the_real_windows_and_songs(report):
    metrics = report["metrics"]
    assert metrics["songs"] == {"generated": 2, "real_windows": 2, "real_test_songs": 3}
    for column in ("generated", "real_windows", "real_test_songs"):
        assert set(metrics[column]) >= {"chord_tone_ratio", "ctnctr", "pitch_class_entropy_h1", "groove_consistency",
                                        "velocity_mean_melody", "velocity_std_piano", "tempo_change_rate",
                                        "tempo_range_bpm", "structure_adherence", "grammar_validity"}
        # The grammar mask makes every generated stream grammatical and exactly as long as its form.
        assert metrics[column]["grammar_validity"]["mean"] == 1.0
        assert metrics[column]["structure_adherence"]["mean"] == 1.0
    # Synthetic melodies put chord tones on strong beats; a random-weight model does not.
    assert metrics["real_windows"]["chord_tone_ratio"]["mean"] > metrics["generated"]["chord_tone_ratio"]["mean"]
    assert len(metrics["per_window"]) == 2


def test_relations_are_scored_against_the_real_tokens(report, report_dir):
    relations = report["relations"]
    assert relations["language"] == "relative" and relations["pitch_positions"] > 0
    assert relations["tempo_positions"] > 0
    assert relations["chord_positions"] > 0
    for key in ("chord_tone_mass", "scale_mass", "tempo_hold", "real_chord_tone", "real_in_scale", "real_tempo_hold",
                "diatonic_chord_mass", "real_diatonic_chord"):
        assert 0 <= relations[key] <= 1, key
    # Synthetic melodies are written on chord tones and in the key; a random-weight model's are not.
    assert relations["real_chord_tone"] > relations["chord_tone_mass"]
    assert relations["real_in_scale"] > max(0.95, relations["scale_mass"])
    assert relations["real_diatonic_chord"] > relations["diatonic_chord_mass"]
    assert "## Relations the model learnt" in EvalDir(report_dir).report_md.read_text()
    # The copy of returning sections (tests/eval/test_relations.py scores it on POP909); none of these synthetic
    # test songs returns a section within 16 bars, so it is reported as unmeasured rather than as a number.
    assert relations["copyable_bars"] <= relations["returning_bars"]
    assert (relations["copy_positions"] == 0) == (relations["return_copy_p"] is None)


def test_the_markdown_states_the_copy_of_returns_where_it_was_measured(report):
    from musicray.eval.markdown import render_markdown

    measured = {**report, "relations": {**report["relations"], "return_copy_p": 0.61, "return_first_p": 0.05,
                                        "copy_positions": 120, "copyable_bars": 9, "returning_bars": 30}}
    text = render_markdown(measured)
    assert "of 30 bars of returning sections, 9 repeat their first occurrence" in text
    assert "0.61" in text and "0.05" in text
    assert "bars of returning sections" not in render_markdown(report)   # unmeasured: not stated as a number


def test_teacher_forced_table_has_adapter_and_stage1_scores(report):
    scores = report["teacher_forced"]
    assert list(scores) == list(SUBTASKS)
    for task in SUBTASKS:
        alone = scores[task]["stage1"]
        assert alone["examples"] == 6 and alone["tokens"] > 0
        assert 0 <= alone["accuracy"] <= alone["masked_accuracy"] <= 1
        assert 0 < alone["masked_loss"] <= alone["loss"]
        if task in ADAPTED:
            # Random non-zero LoRA weights change the model.
            assert scores[task]["adapter"]["loss"] != pytest.approx(alone["loss"], abs=1e-6)
        else:
            assert scores[task]["adapter"] is None


def test_ablation_table_has_the_four_ablations_and_the_reference(report):
    rows = report["ablations"]["table"]
    assert [(row["ablation"], row["variant"].split(" ")[0]) for row in rows] == [
        ("generation mask", "on"), ("generation mask", "off"),
        ("mask in the stage-1 loss", "off"), ("mask in the stage-1 loss", "on"),
        ("LoRA adapters", "adapters"), ("LoRA adapters", "stage-1"),
        ("music language", "relative"), ("music language", "absolute"), ("reference", "real")]
    mask_on, mask_off, loss_off, loss_on, adapters, alone, relative, absolute, real = rows
    assert mask_on["songs_valid"] == mask_on["stages_valid"] == mask_on["structure_adherence"] == 1.0
    # Random weights without the mask do not write grammatical streams.
    assert mask_off["songs_valid"] == 0.0 and mask_off["stages_valid"] < 1.0
    assert "ablations/mask_loss_on" in loss_on["variant"]
    assert loss_on["loss"] != pytest.approx(loss_off["loss"])
    assert adapters["loss"] != pytest.approx(alone["loss"])
    assert alone["songs_valid"] == 1.0
    # Both languages compose grammatical songs and are scored on the same relations, each in its own tokens.
    assert relative["songs_valid"] == absolute["songs_valid"] == 1.0
    assert "ablations/language_absolute" in absolute["variant"]
    for key in ("chord_tone_ratio", "chord_tone_mass", "scale_mass", "tempo_hold"):
        assert 0 <= relative[key] <= 1 and 0 <= absolute[key] <= 1, key
    assert real["chord_tone_mass"] == report["relations"]["real_chord_tone"]
    assert report["ablations"]["language"]["other"]["relations"]["language"] == "absolute"
    failed = report["ablations"]["generation_mask"]["off"]["songs"]
    assert failed["valid"] == 0 and sum(failed["failed_at"].values()) == 2 and len(failed["errors"]) == 2


def test_plots_and_songs_are_written(report, report_dir):
    assert set(report["plots"]) == set(PLOTS)
    for name in PLOTS:
        path = report_dir / report["plots"][name]
        assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(EvalDir(report_dir).songs.glob("*.generated.mid"))) == 2


def test_report_md_shows_the_tables_and_links_the_plots(report_dir, report):
    text = EvalDir(report_dir).report_md.read_text()
    for heading in ("## Generated vs real", "## Teacher-forced scores", "## Ablations", "## Plots", "## Sources"):
        assert heading in text
    assert "| chord_tone_ratio |" in text and "| generation mask | off (adapters) |" in text
    assert "| music language | absolute (ablations/language_absolute) |" in text
    for name in PLOTS:
        assert f"]({report['plots'][name]})" in text
    assert "Wu & Yang 2020" in text and "Yeh et al. 2021" in text


def test_a_run_without_the_ablation_arms_says_not_run(eval_run, eval_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(eval_run, run, ignore=shutil.ignore_patterns(RunDir(eval_run).ablations.name))
    report = evaluate_run(run, eval_data, tmp_path / "out", EvalConfig(songs=1, max_bars=1, max_examples=2),
                          progress=False)
    assert report["ablations"]["loss_mask"]["other"] == "not run"
    assert report["ablations"]["table"][3]["variant"] == "on: not run"
    assert any("loss-mask ablation not run" in note for note in report["notes"])
    assert report["ablations"]["language"]["other"] == "not run"
    assert report["ablations"]["table"][7]["variant"] == "absolute: not run"
    RunDir(run).stage1_metrics.unlink()
    report = evaluate_run(run, eval_data, tmp_path / "out2", EvalConfig(songs=1, max_bars=1, max_examples=2,
                                                                        ablation_windows=0), progress=False)
    assert report["plots"]["training_curves"].startswith("skipped:")
    # No ablation window: the mask-off and single-stage rows are empty, the composed songs are still judged.
    mask_off = report["ablations"]["table"][1]
    assert mask_off["variant"] == "off (adapters)" and "songs_valid" not in mask_off
    assert report["ablations"]["generation_mask"]["on"]["stages"]["streams"] == 0
    assert report["metrics"]["generated"]["grammar_validity"]["mean"] == 1.0
    assert "training_curves: skipped:" in EvalDir(tmp_path / "out2").report_md.read_text()


def test_cli_eval_writes_the_report(eval_run, eval_data, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["eval", "--run", str(eval_run), "--data", str(eval_data), "--out", str(out), "--songs", "1",
                 "--max-bars", "1", "--max-examples", "2", "--stage-sampling", "melody:temperature=0.8",
                 "--quiet"]) == 0
    assert EvalDir(out).report_md.name in capsys.readouterr().out
    report = json.loads(EvalDir(out).report_json.read_text())
    assert report["settings"]["max_examples"] == 2
    assert report["settings"]["sampling"] == {"melody": {"temperature": 0.8}}
    assert any(note.startswith("sampling: melody at temperature 0.8; the other stages temperature 1")
               for note in report["notes"])


def test_variants_compose_the_same_windows_with_one_setting_changed(eval_run, eval_data, tmp_path):
    settings = EvalConfig(songs=2, max_bars=2, max_examples=2, seed=5, sampling={"melody": {"temperature": 0}},
                          guard_ablation=True, sampling_ablation=True, ablation_windows=1)
    report = evaluate_run(eval_run, eval_data, tmp_path / "out", settings, progress=False)
    rows = [(row["ablation"], row["variant"]) for row in report["ablations"]["table"]]
    assert rows[4:8] == [("sampling", "the run's eval.sampling (adapters, mask on)"),
                         ("sampling", "every stage at temperature 1"),
                         ("harmony guard", "on (adapters, mask on)"), ("harmony guard", "off")]
    variants = report["ablations"]["variants"]
    assert list(variants) == ["temperature 1", "harmony guard off"]
    assert all(v["songs"]["valid"] == v["songs"]["total"] == 2 for v in variants.values())
    # One setting changed, same seeds: the songs differ from the main composition's (greedy melody vs sampled).
    per_song = report["structure"]["per_song"]
    for label in variants:
        assert per_song[f"variant: {label}"] != per_song["generated"], label
    # A random-weight model draws pitches far outside the registers unless the guard keeps it in them.
    ranges = {label: sum(song["pitch_range_melody"] for song in songs) for label, songs in per_song.items()}
    assert ranges["variant: harmony guard off"] > ranges["generated"]
    assert report["ablations"]["generation_mask"]["off"]["songs"]["total"] == 1
    assert any("the first 1 of the 2 windows" in note for note in report["notes"])
    assert report["ablations"]["generation_mask"]["on"]["stages"]["streams"] == 5   # one window, five stages
    row = next(r for r in report["structure"]["rows"] if r["measure"] == "velocity_mean_melody")
    assert set(row["variants"]) == {"temperature 1", "harmony guard off"} and " - " in row["goal"]   # within 10 %
    text = EvalDir(tmp_path / "out").report_md.read_text()
    assert "generated, harmony guard off (met)" in text and "| harmony guard | off |" in text
    assert "real vs generated, temperature 1:" in text


def test_settings_come_from_the_run_config_and_flags(eval_run, tmp_path):
    RunDir(eval_run).stage1_config.write_text("eval:\n  songs: 3\n  seed: 7\n")
    try:
        settings = settings_for(eval_run, songs=None, seed=9)
    finally:
        RunDir(eval_run).stage1_config.unlink()
    assert (settings.songs, settings.seed, settings.max_bars) == (3, 9, EvalConfig().max_bars)


BAD_INPUT = {
    "missing run dir": (lambda run, data, tmp: (tmp / "nowhere", data), "--run: .* does not exist"),
    "no stage-1 model": (lambda run, data, tmp: (tmp, data), "has no stage-1 model"),
    "not a data dir": (lambda run, data, tmp: (run, tmp), "--data: .* not a prepared data dir"),
    "empty test split": (lambda run, data, tmp: (run, _train_only(tmp)), "no songs in its test split"),
}


def _without(run, tmp, name):
    copy = tmp / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(name))
    return copy


def test_a_run_without_adapters_is_evaluated_on_stage1_alone(eval_run, eval_data, tmp_path):
    run = _without(eval_run, tmp_path, RunDir(eval_run).adapters.name)
    report = evaluate_run(run, eval_data, tmp_path / "out", EvalConfig(songs=1, max_bars=2, max_examples=2,
                                                                       batch_size=2), progress=False)
    assert all(report["teacher_forced"][task]["adapter"] is None for task in SUBTASKS)
    assert report["metrics"]["generated"]["grammar_validity"]["mean"] == 1.0
    assert any("no LoRA adapter for chord, melody, secondary, dynamics, tempo" in note for note in report["notes"])


def _train_only(tmp):
    out = tmp / "train-only"
    write_data(out, TRAIN_SONGS)
    return out


@pytest.mark.parametrize("make, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_a_one_line_error(eval_run, eval_data, tmp_path, capsys, make, message):
    import re

    run, data = make(eval_run, eval_data, tmp_path)
    assert main(["eval", "--run", str(run), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_bad_settings_name_the_setting(eval_run, eval_data, tmp_path, capsys):
    assert main(["eval", "--run", str(eval_run), "--data", str(eval_data), "--out", str(tmp_path), "--songs",
                 "0"]) == 2
    assert "eval.songs" in capsys.readouterr().err
    assert main(["eval", "--run", str(eval_run), "--data", str(eval_data), "--out", str(tmp_path),
                 "--ablation-windows", "-1"]) == 2
    assert "eval.ablation_windows: -1" in capsys.readouterr().err
    assert main(["eval", "--run", str(eval_run), "--data", str(eval_data), "--out", str(tmp_path),
                 "--stage-sampling", "melody:temperature=-1"]) == 2
    assert "--stage-sampling: melody.temperature: '-1' is not 0..10" in capsys.readouterr().err


def test_report_has_the_structure_and_key_table(report, report_dir):
    from musicray.eval.structure import MEASURES

    structure = report["structure"]
    rows = {row["measure"]: row for row in structure["rows"]}
    assert list(rows) == list(MEASURES)
    # The real reference is the same code on the same windows (2) and on the whole test songs (3).
    assert rows["chord_time_in_scale"]["real"]["n"] == 2 and rows["chord_time_in_scale"]["real_songs"]["n"] == 3
    assert rows["scale_consistency_melody"]["goal"] == "≥ 0.97"
    whole = rows["scale_consistency_melody"]["real_songs"]
    assert whole["low"] <= whole["mean"] <= whole["high"] <= 1.0
    classifier = structure["classifier"]
    assert (classifier["real_songs"], classifier["generated_songs"], classifier["folds"]) == (2, 2, 2)
    text = EvalDir(report_dir).report_md.read_text()
    assert "## Structure and key" in text and "| scale_consistency_melody |" in text
    assert "real vs generated" in text and "MusPy: A Toolkit for Symbolic Music Generation" in text
