"""benchmarks/pretrained_experiment.py on synthetic songs and the built-in tiny base: a full fine-tune and LoRA with
the music tokens' rows trainable, a few steps each on the same data."""

import json

import pretrained_experiment
import pytest


@pytest.mark.parametrize("stage1", ["full", "lora"])
def test_an_arm_trains_and_is_measured_on_every_relation(tmp_path, split_data, stage1):
    data = split_data
    out = tmp_path / stage1
    assert pretrained_experiment.main([
        "--data", str(data), "--cache", str(tmp_path / "cache"), "--out", str(out), "--bases", "tiny",
        "--stage1", stage1, "--lora-rank", "2", "--steps", "2", "--max-length", "256", "--train-songs", "1",
        "--eval-examples", "2", "--threads", "1"]) == 0
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
