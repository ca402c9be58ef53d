"""benchmarks/language_experiment.py on synthetic songs: two chord languages trained a few steps on the same
examples, then measured on the same test windows."""

import json

import language_experiment


def test_chord_languages_are_measured_per_key_mode_on_the_same_windows(tmp_path, split_data):
    data = split_data
    out = tmp_path / "out"
    assert language_experiment.main([
        "--data", str(data), "--out", str(out), "--tasks", "chord", "melody", "--languages", "relative",
        "tonic-degree", "--steps", "2", "--batch-size", "2", "--hidden", "32", "--layers", "1", "--head-dim", "16",
        "--train-songs", "1", "--eval-examples", "6", "--generate", "3", "--windows-per-song", "1",
        "--threads", "1"]) == 0
    results = {r["language"]: r for r in json.loads((out / "language_experiment.json").read_text())["results"]}
    assert {results[name]["vocab"]["chords"] for name in results} == {"relative_major", "degree"}
    relative, tonic = results["relative"], results["tonic-degree"]
    # Windows from different songs, and the real songs' figures are the language's business only in how they are
    # written: the same in both languages.
    assert relative["generated"]["windows"] == 3
    for key in ("real_chord_tone_ratio", "chord_time_in_scale_maj_real", "chord_time_in_scale_min_real"):
        assert relative["generated"][key] == tonic["generated"][key], key
    for key in ("real_diatonic_chord_maj", "real_diatonic_chord_min", "real_in_scale"):
        assert relative["relations"][key] == tonic["relations"][key], key
    for result in results.values():
        measured = [result["relations"].get(f"diatonic_chord_mass_{mode}") for mode in ("maj", "min")]
        measured += [result["generated"].get(f"chord_time_in_scale_{mode}") for mode in ("maj", "min")]
        assert any(value is not None for value in measured)
        assert all(0 <= value <= 1 for value in measured if value is not None)
