"""``musicray generate --stream``: a song composed on an in-process vLLM engine, its bars printed as they come."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from musicray.midi import read_midi  # noqa: E402
from musicray.run import RunDir  # noqa: E402
from musicray.tokens import SUBTASKS  # noqa: E402


def test_generate_stream_prints_every_stage_and_its_bars_in_order(tmp_path, make_random_run, capsys):
    from musicray.cli import main

    run = tmp_path / "run"
    make_random_run(run, ["chord", "melody", "tempo"], tmp_path / "cache")   # the others run on stage 1 alone
    out = tmp_path / "song.mid"
    assert main(["generate", "--run", str(run), "--form", "A2b1", "--seed", "3", "--stream", "--out", str(out),
                 "--allow-missing-adapters"]) == 0
    # (vLLM's own log lines go to the same stdout: only the command's lines are read)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("== ", "   "))]
    stages = [line.split()[1] for line in lines if line.startswith("== ")]
    assert stages == list(SUBTASKS)
    for task in SUBTASKS:
        start = lines.index(next(line for line in lines if line.startswith(f"== {task} ")))
        bars = [line for line in lines[start + 1:start + 4]]
        assert [line.split()[1] for line in bars] == ["1", "2", "3"], bars
        assert "(A2 bar 1)" in bars[0] and "(b1 bar 1)" in bars[2]
    song = read_midi(out)
    assert song.form == "A2b1" and song.n_bars == 3
    report = json.loads(out.with_suffix(".json").read_text())
    assert {task: info["adapter"] for task, info in report["stages"].items()} == {
        "chord": "chord", "melody": "melody", "secondary": None, "dynamics": None, "tempo": "tempo"}
    assert all(info["grammar_errors"] == 0 for info in report["stages"].values())


def test_an_adapter_vllm_cannot_load_is_refused_before_the_engine_starts(tmp_path, make_random_run):
    """PEFT saves the resized embedding and lm_head beside the LoRA matrices unless told not to; vLLM would die on
    such an adapter at its first request, taking every other request with it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from musicray.model import load_music_model
    from musicray.engine.vllm_engine import VllmStages
    from musicray.song import SongError

    run = tmp_path / "run"
    make_random_run(run, [], tmp_path / "cache")
    model, _ = load_music_model(RunDir(run).stage1_model)
    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted.save_pretrained(RunDir(run).adapter("melody"), save_embedding_layers=True)
    with pytest.raises(SongError, match=r"adapters: .*melody.*(embed_tokens|lm_head)"):
        VllmStages(run)
