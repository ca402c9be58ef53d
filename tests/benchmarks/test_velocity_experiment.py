"""benchmarks/velocity_experiment.py on two random-weight runs that differ in vocab.velocity only."""

import json
import shutil

import velocity_experiment

from musicray.run import RunDir
from musicray.song import TRACKS
from musicray.tokens import Vocabulary


def test_both_languages_compose_the_same_windows_and_read_velocities_per_track(tmp_path, make_random_run,
                                                                               split_data):
    data, vocab = split_data, Vocabulary()
    absolute = tmp_path / "absolute"
    make_random_run(absolute, ("dynamics",), tmp_path / "cache")
    track = tmp_path / "track"
    shutil.copytree(absolute, track)
    vocabulary = RunDir(track).stage1_model / "vocabulary.json"
    saved = json.loads(vocabulary.read_text())
    saved["config"]["velocity"] = "track"
    vocabulary.write_text(json.dumps(saved))

    out = tmp_path / "velocities.json"
    assert velocity_experiment.main(["--data", str(data), "--run", f"absolute={absolute}", "--run", f"track={track}",
                                     "--songs", "2", "--max-bars", "8", "--window", "sections", "--tf-examples", "2",
                                     "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {results[name]["velocity"] for name in ("absolute", "track")} == {"absolute", "track"}
    for name in ("absolute", "track"):
        assert results[name]["windows"] == 2
        for name_of_track in TRACKS:
            composed = results[name]["composed"][name_of_track]["mean"]
            if composed is None:   # a track silent in every window
                continue
            assert 1 <= composed["low"] <= composed["mean"] <= composed["high"] <= 127
            tf = results[name]["teacher_forced"][name_of_track]
            if tf["notes"]:
                # the real velocity read back through the language is the song's own, in either language
                assert abs(tf["real"] - results["track" if name == "absolute" else "absolute"]["teacher_forced"]
                           [name_of_track]["real"]) <= 127 / vocab.config.velocity_bins
