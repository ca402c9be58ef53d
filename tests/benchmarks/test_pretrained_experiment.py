"""benchmarks/pretrained_experiment.py on synthetic songs and the built-in tiny base: a full fine-tune and LoRA with
the music tokens' rows trainable, a few steps each on the same data, each measured, composed with and put in one
table with the other."""

import json

import pretrained_experiment
import pytest


@pytest.mark.parametrize("stage1", ["full", "lora"])
def test_an_arm_trains_and_is_measured_on_every_relation(tmp_path, split_data, stage1):
    data = split_data
    out = tmp_path / stage1
    assert pretrained_experiment.main([
        "--data", str(data), "--cache", str(tmp_path / "cache"), "--out", str(out), "--bases", "tiny",
        "--stage1", stage1, "--lora-rank", "2", "--steps", "2", "--max-length", "1024", "--train-songs", "1",
        "--eval-examples", "2", "--threads", "1", "--compose", "2", "--compose-bars", "32",
        "--copy-max-bars", "32"]) == 0
    result = json.loads((out / "pretrained_experiment.json").read_text())["results"][0]
    assert result["stage1"] == stage1 and result["steps"] == 2 and len(result["losses"]) == 2
    total = result["total_parameters"]
    if stage1 == "full":
        assert result["trainable_parameters"] == total
    else:   # LoRA matrices and the music tokens' rows, a small share of the model
        assert 0 < result["trainable_parameters"] < total / 2
    relations = result["relations"]
    for key in ("chord_tone_mass", "scale_mass", "tempo_hold", "diatonic_chord_mass"):
        assert 0 <= relations[key] <= 1, key
    copies = result["return_copy"]
    assert copies["examples"] > 0 and copies["copyable_bars"] <= copies["returning_bars"]
    assert 0 <= copies["copy_p"] <= 1 and 0 <= copies["first_p"] <= 1
    # The composed windows: the saved stage-1 model (LoRA merged into it) wrote chords and melody for two forms.
    composed = result["composed"]
    assert composed["songs"] == 2
    assert (out / f"tiny-{stage1}" / "stage1" / "model" / "vocabulary.json").is_file()
    for row in composed["rows"].values():
        assert row["real"] is not None
    assert composed["rows"]["chord_time_in_scale"]["generated"]["n"] == 2
    assert (out / "loss_curves.png").stat().st_size > 0


def test_tables_from_earlier_runs_go_into_one_table(tmp_path, split_data, capsys):
    """Two bases trained in separate processes (here one after another) and put side by side afterwards."""
    outs = []
    for base in ("tiny", "tiny"):
        outs.append(tmp_path / f"run{len(outs)}")
        assert pretrained_experiment.main([
            "--data", str(split_data), "--cache", str(tmp_path / "cache"), "--out", str(outs[-1]), "--bases", base,
            "--steps", "1", "--max-length", "256", "--train-songs", "1", "--eval-examples", "1",
            "--threads", "1"]) == 0
    capsys.readouterr()
    assert pretrained_experiment.main(["--out", str(tmp_path / "both"), "--tables-from", *map(str, outs)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| tiny | full |") == 4   # two rows in each of the two tables (nothing composed)
    assert (tmp_path / "both" / "loss_curves.png").stat().st_size > 0
