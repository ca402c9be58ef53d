"""The evaluation figures on real POP909 and synthetic songs and on CSVs in the layout the trainers write."""

import csv
import re
import struct

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from musicray.data.synth import synth_song
from musicray.eval import plots
from musicray.song import Note, Song, Tempo, parse_form
from musicray.train.stage1_metrics import METRIC_COLUMNS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRIAL_COLUMNS = ("trial_id", "subtask", "rank", "alpha", "dropout", "learning_rate", "target_modules",
                 "best_val_loss", "best_step", "steps", "stopped_early", "status", "chosen")


@pytest.fixture(scope="module")
def real_song(pop909_root):
    from musicray.data.pop909 import load_song

    song, _ = load_song(pop909_root, "002")
    return song


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sensible_png(path, min_width=600, min_height=300):
    assert path.is_file()
    width, height = png_size(path)
    assert min_width <= width <= 4000 and min_height <= height <= 3000, (width, height)
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05, "the image is (nearly) blank"


def pixels_of_colour(path, colour: str) -> int:
    """Pixels showing ``colour`` at any opacity over white: 1 - pixel is then a multiple of 1 - colour."""
    rgb = imread(path)[..., :3].reshape(-1, 3).astype(float)
    ink = 1 - rgb
    target = 1 - np.array(to_rgb(colour))
    norms = np.linalg.norm(ink, axis=1)
    cosine = ink @ target / np.maximum(norms * np.linalg.norm(target), 1e-9)
    return int(np.count_nonzero((norms > 0.15) & (cosine > 0.995)))


def write_metrics(path, rows):
    with path.open("w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(METRIC_COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in METRIC_COLUMNS])
    return path


def metrics_rows(steps, start_step=0, val_every=10):
    return [{"step": s, "loss": 5.0 * 0.97 ** s + 1.0, "learning_rate": 1e-4, "tokens_per_s": 800.0,
             "labelled_tokens_per_s": 200.0, "tokens": 4096, "labelled_tokens": 1000, "step_s": 0.4,
             "val_loss": 5.2 * 0.97 ** s + 1.1 if s % val_every == 0 else None, "start_step": start_step,
             "time": 1000.0 + s} for s in steps]


def write_trials(path, rows, columns=TRIAL_COLUMNS):
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def trial(subtask, index, loss, **extra):
    return {"trial_id": f"{subtask[:3]}_{index:05d}", "subtask": subtask, "rank": 8, "alpha": 16, "dropout": 0.05,
            "learning_rate": 3e-4, "target_modules": "q_proj,v_proj", "best_val_loss": loss, "best_step": 20,
            "steps": 40, "stopped_early": False, "status": "done", "chosen": False, **extra}


# -- piano roll ---------------------------------------------------------------------------------------------------
def test_piano_roll_of_a_real_song_shows_every_track(real_song, tmp_path):
    path = plots.piano_roll(real_song, tmp_path / "roll.png")
    assert path == tmp_path / "roll.png"
    assert_sensible_png(path, min_width=1000)
    for track, colour in plots.TRACK_COLOURS.items():
        assert real_song.tracks[track]
        assert pixels_of_colour(path, colour) > 1000, track


def test_piano_roll_leaves_out_an_empty_track_and_writes_nested_dirs(tmp_path):
    song = synth_song(3)
    song.tracks["BRIDGE"] = []
    path = plots.piano_roll(song, tmp_path / "deep" / "er" / "roll.png", title="no bridge")
    assert_sensible_png(path)
    assert pixels_of_colour(path, plots.TRACK_COLOURS["BRIDGE"]) == 0
    assert pixels_of_colour(path, plots.TRACK_COLOURS["MELODY"]) > 500


def test_piano_roll_rejects_a_song_without_notes(tmp_path):
    song = synth_song(3)
    empty = song.replace(tracks={name: [] for name in song.tracks})
    with pytest.raises(ValueError, match="has no notes"):
        plots.piano_roll(empty, tmp_path / "roll.png")
    with pytest.raises(TypeError, match="expected a musicray Song, got list"):
        plots.piano_roll([("MELODY", Note(0, 0, 60, 4, 80))], tmp_path / "roll.png")
    assert not (tmp_path / "roll.png").exists()


def test_piano_roll_rejects_a_broken_song_naming_the_field(tmp_path):
    song = synth_song(3)
    song.tracks["MELODY"] = [Note(song.n_bars + 2, 0, 60, 4, 80)]
    with pytest.raises(ValueError, match="MELODY note: time"):
        plots.piano_roll(song, tmp_path / "roll.png")


# -- performance curves -------------------------------------------------------------------------------------------
def test_performance_curves_of_a_synthetic_song_against_a_real_one(real_song, tmp_path):
    path = plots.performance_curves(synth_song(5), real_song, tmp_path / "curves.png")
    assert_sensible_png(path, min_width=900, min_height=600)
    for colour in plots.TRACK_COLOURS.values():
        assert pixels_of_colour(path, colour) > 300


def test_bar_tempos_average_changes_inside_a_bar_and_default_like_a_midi_player():
    song = Song("t", "C:maj", "4/4", parse_form("A4"), tempos=[Tempo(1, 0, 100.0), Tempo(1, 8, 60.0)])
    tempos = plots._bar_tempos(song)
    assert tempos[0] == 120.0  # before the first tempo event
    assert tempos[1] == pytest.approx(80.0)
    assert np.all(tempos[2:] == 60.0)
    compound = Song("c", "C:maj", "6/8", parse_form("A4"))
    assert np.all(plots._bar_tempos(compound) == 80.0)  # 120 quarter notes per minute = 80 dotted quarters


def test_bar_velocities_are_per_track_means_with_gaps_for_silent_bars():
    song = Song("v", "C:maj", "4/4", parse_form("A4"))
    song.tracks["MELODY"] = [Note(0, 0, 60, 4, 40), Note(0, 4, 62, 4, 80), Note(2, 0, 64, 4, 100)]
    velocities = plots._bar_velocities(song, "MELODY")
    assert velocities[0] == 60 and np.isnan(velocities[1]) and velocities[2] == 100
    assert np.isnan(plots._bar_velocities(song, "PIANO")).all()


def test_performance_curves_reject_an_empty_reference(tmp_path):
    song = synth_song(5)
    with pytest.raises(ValueError, match="reference: song 'x' has no notes"):
        plots.performance_curves(song, Song("x", "C:maj", "4/4", song.sections), tmp_path / "curves.png")


# -- training curves ----------------------------------------------------------------------------------------------
def test_training_curves_from_a_resumed_run(tmp_path):
    # A run that stopped after step 60, resumed from its checkpoint at step 50 and appended steps 51..120.
    rows = metrics_rows(range(1, 61)) + metrics_rows(range(51, 121), start_step=50)
    path = plots.training_curves(write_metrics(tmp_path / "metrics.csv", rows), tmp_path / "train.png")
    assert_sensible_png(path)
    assert pixels_of_colour(path, "#1f77b4") > 500 and pixels_of_colour(path, "#ff7f0e") > 100


def test_training_curves_without_validation_columns(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss\n1,4.5\n2,4.1\n3,3.9\n")
    path = plots.training_curves(metrics, tmp_path / "train.png")
    assert_sensible_png(path)
    assert pixels_of_colour(path, "#ff7f0e") == 0


@pytest.mark.parametrize("text, message", [
    ("step,learning_rate\n1,0.001\n", "missing column.*loss; found: step, learning_rate"),
    ("step,loss\n", "header but no rows"),
    ("", "is empty"),
    ("step,loss\n1,4.5\n2,nan-ish\n", "column loss has a non-number 'nan-ish' in data row 2"),
])
def test_training_curves_reject_bad_csv(tmp_path, text, message):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(text)
    with pytest.raises(ValueError, match=message):
        plots.training_curves(metrics, tmp_path / "train.png")


def test_training_curves_of_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.csv does not exist"):
        plots.training_curves(tmp_path / "nothing.csv", tmp_path / "train.png")


# -- sweep table --------------------------------------------------------------------------------------------------
def test_sweep_table_highlights_the_best_trial_of_each_subtask(tmp_path):
    rows = [trial("chord", 0, 2.0), trial("chord", 1, 1.5), trial("chord", 2, float("nan"), status="error"),
            trial("melody", 0, 1.2), trial("melody", 1, 3.0), trial("tempo", 0, 0.9)]
    path = plots.sweep_table(write_trials(tmp_path / "trials.csv", rows), tmp_path / "sweep.png")
    assert_sensible_png(path, min_width=800, min_height=150)
    highlighted = pixels_of_colour(path, plots.BEST_ROW_COLOUR)
    # Three best rows of the same height; the same table with one sub-task has a third of the highlight.
    single = plots.sweep_table(write_trials(tmp_path / "one.csv", rows[:3]), tmp_path / "one.png")
    assert highlighted > 0
    assert pixels_of_colour(single, plots.BEST_ROW_COLOUR) == pytest.approx(highlighted / 3, rel=0.25)


def test_sweep_table_with_only_the_required_columns(tmp_path):
    trials = tmp_path / "trials.csv"
    trials.write_text("trial_id,subtask,best_val_loss\na,chord,1.0\nb,chord,0.5\n")
    assert_sensible_png(plots.sweep_table(trials, tmp_path / "sweep.png"), min_width=600, min_height=100)


@pytest.mark.parametrize("text, message", [
    ("trial_id,rank\na,4\n", "missing column.*subtask, best_val_loss"),
    ("trial_id,subtask,best_val_loss\n", "header but no rows"),
    ("trial_id,subtask,best_val_loss\na,chord,low\n", "best_val_loss has a non-number 'low' in data row 1"),
    ("trial_id,subtask,best_val_loss\na,chord,1.0\nb,,2.0\n", "data row 2 has no subtask"),
])
def test_sweep_table_rejects_bad_csv(tmp_path, text, message):
    trials = tmp_path / "trials.csv"
    trials.write_text(text)
    with pytest.raises(ValueError, match=message):
        plots.sweep_table(trials, tmp_path / "sweep.png")


def test_compared_loss_curves_draw_every_training_against_tokens_and_seconds(tmp_path):
    curves = {"pretrained": [(400, 10.0, 14.8), (800, 20.5, 13.9), (1200, 31.0, 12.0)],
              "fresh weights": [(400, 9.0, 10.9), (800, 18.0, 10.2)]}
    path = plots.compared_loss_curves(curves, tmp_path / "loss.png")
    assert_sensible_png(path)
    # matplotlib's first two cycle colours: one line per training in each panel
    assert pixels_of_colour(path, "#1f77b4") > 100 and pixels_of_colour(path, "#ff7f0e") > 100


@pytest.mark.parametrize("curves, message", [
    ({}, "no curve"),
    ({"arm": []}, "'arm'"),
    ({"arm": [(400, 10.0)]}, "(tokens, seconds, loss)"),
])
def test_compared_loss_curves_reject_a_malformed_curve_naming_it(tmp_path, curves, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plots.compared_loss_curves(curves, tmp_path / "loss.png")
