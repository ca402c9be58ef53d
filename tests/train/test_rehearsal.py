"""The GPU-cluster path at Llama 3's shapes, rehearsed on a CPU (issue 19): the ``rehearsal-small`` base (Llama 3's
full 128,256-id vocabulary with its special tokens at their ids, llama3 rope scaling, tied embeddings, grouped-query
attention; hidden 256, 2 layers) through the vocabulary extension, stage 1 on 2 Ray Train workers under ZeRO-3, a
resume that continues the loss curve exactly, the consolidated export, stage 2 (one short LoRA trial per sub-task)
and one song composed by the native loop and by vLLM with all five adapters.

configs/rehearsal.yaml is the full-width preset (hidden 2048); only ``base_model`` and the data size differ here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from musicray.model import (
    BUILT_IN, LLAMA3_TEXT_VOCAB, REHEARSAL, add_music_tokens, load_base, load_music_model, llama3_special_tokens,
)
from musicray.tokens import SUBTASKS, Vocabulary
from musicray.train.config import load_config

from .stage1_runs import metrics, stage1_settings

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "rehearsal.yaml"
STEPS = 2

# Llama-3.2-1B-Instruct's tokenizer_config: the special tokens the chat format and training use, at their ids.
LLAMA3_IDS = [("<|begin_of_text|>", 128000), ("<|end_of_text|>", 128001), ("<|reserved_special_token_0|>", 128002),
              ("<|finetune_right_pad_id|>", 128004), ("<|start_header_id|>", 128006), ("<|end_header_id|>", 128007),
              ("<|eom_id|>", 128008), ("<|eot_id|>", 128009), ("<|python_tag|>", 128010),
              ("<|reserved_special_token_3|>", 128011), ("<|reserved_special_token_247|>", 128255)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rehearsal-cache")


@pytest.fixture(scope="module")
def base(cache_dir):
    return load_base("rehearsal-small", cache_dir)


@pytest.mark.parametrize("token,llama3_id", LLAMA3_IDS)
def test_special_tokens_sit_at_their_llama3_ids(base, token, llama3_id):
    _, tokenizer = base
    assert tokenizer.convert_tokens_to_ids(token) == llama3_id


def test_the_base_has_llama3_2_1b_s_configuration_but_2_layers(base):
    model, tokenizer = base
    config = model.config
    assert len(tokenizer) == config.vocab_size == 128256 and len(llama3_special_tokens()) == 256
    assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (128000, 128009, 128004)
    assert config.head_dim == 64 and config.num_hidden_layers == 2
    # The full-width preset is Llama-3.2-1B's published shape; the test's copy differs in width only.
    published = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "text_vocab_size": LLAMA3_TEXT_VOCAB}
    assert {name: getattr(REHEARSAL, name) for name in published} == published
    small = BUILT_IN["rehearsal-small"]
    differ = {name for name in REHEARSAL.__dataclass_fields__ if getattr(small, name) != getattr(REHEARSAL, name)}
    assert differ == {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"}


def test_the_chat_format_is_llama3_s_and_text_never_meets_the_unused_ids(base):
    _, tokenizer = base
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "A song, please."}],
                                             add_generation_prompt=True, tokenize=False)
    assert rendered == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nA song, please.<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    text = "The chorus returns in bar 9, louder: ¿ça va? 音楽 🎵"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    learned = max(ids)
    unused = tokenizer.convert_tokens_to_ids("<|unused_text_token_0|>")
    assert learned < unused < LLAMA3_TEXT_VOCAB


def test_music_tokens_follow_id_128255_with_rows_from_the_mean(cache_dir):
    model, tokenizer = load_base("rehearsal-small", cache_dir)
    old = model.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    music = add_music_tokens(model, tokenizer, Vocabulary())
    assert music.offset == 128256 and music.eot_id == 128009
    weight = model.get_input_embeddings().weight.detach()
    assert weight.shape[0] == 128256 + len(music.vocab) and model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(weight[:128256], old)
    new = weight[128256:]
    # Drawn around the old rows' mean with their covariance scaled by 1e-9 (transformers' mean_resizing): every new
    # row is the old mean, up to a spread far below that of the old rows.
    spread = old.std(dim=0).mean().item()
    assert (new - old.mean(dim=0)).abs().max() < 0.01 * spread
    assert 0 < new.std(dim=0).mean() < 1e-3 * spread


# -- the ZeRO-3 path ----------------------------------------------------------------------------------------------
def config(cache_dir: Path, **sets):
    return load_config(PRESET, stage1_settings(cache_dir, **{
        "base_model": "rehearsal-small", "stage1.learning_rate": 0.001, "stage1.max_steps": STEPS,
        "stage1.checkpoint_every": STEPS, **sets}))


@pytest.fixture(scope="module")
def reference(ray_cluster, cache_dir, tmp_path_factory) -> Path:
    """The uninterrupted ZeRO-3 run; stage 2 and both engines run on it."""
    from musicray.train.finetune import train_stage1

    run_dir = tmp_path_factory.mktemp("reference")
    assert config(cache_dir).stage1.deepspeed == "configs/deepspeed/zero3.json"
    train_stage1(config(cache_dir), run_dir, progress=False)
    return run_dir


@pytest.mark.slow
def test_stage1_under_zero3_resumes_exactly_and_exports_one_model(reference, cache_dir, tmp_path):
    from musicray.train.finetune import train_stage1

    rows = metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and all(r["start_step"] == 0 for r in rows)
    checkpoint = reference / "ray" / "stage1" / f"checkpoint_{STEPS:06d}" / f"global_step{STEPS}"
    shards = sorted(p.name for p in checkpoint.glob("*optim_states.pt"))
    assert len(shards) == 2, shards      # ZeRO-3: each of the 2 ranks holds its shard of the optimizer states

    # Stopped after one step, then resumed from its checkpoint: the loss curve goes on as if never stopped. The
    # resumed part recomputes its activations (stage1.gradient_checkpointing, under ZeRO-3): the same losses.
    run_dir = tmp_path / "run"
    train_stage1(config(cache_dir, **{"stage1.max_steps": 1, "stage1.checkpoint_every": 1}), run_dir, progress=False)
    train_stage1(config(cache_dir, **{"stage1.gradient_checkpointing": True}), run_dir, resume=True, progress=False)
    resumed = metrics(run_dir)
    assert [(r["step"], r["start_step"]) for r in resumed] == [(1, 0)] + [(s, 1) for s in range(2, STEPS + 1)]
    for row, ref in zip(resumed, rows):
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5), row["step"]
    # The weights did move: two steps of a 128k-row model move the loss by ~4e-5 of itself (11.8218 -> 11.8223)
    assert resumed[-1]["loss"] != pytest.approx(rows[0]["loss"], rel=1e-5)

    # One consolidated save_pretrained model, loaded with from_pretrained: tied, the music rows trained.
    model, music = load_music_model(reference / "stage1" / "model")
    again = load_music_model(run_dir / "stage1" / "model")[0].state_dict()
    assert max((again[k] - v).abs().max().item() for k, v in model.state_dict().items()) <= 1e-6
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.get_input_embeddings().weight
    assert music.offset == 128256 and model.config.vocab_size == 128256 + len(music.vocab)
    init = load_music_model(reference / "stage1" / "init")[0].get_input_embeddings().weight
    trained = model.get_input_embeddings().weight
    assert not torch.equal(trained[music.offset:], init[music.offset:])


@pytest.mark.slow
def test_stage2_and_a_song_from_each_engine_with_every_adapter(reference, cache_dir):
    from musicray.compose import Composer
    from musicray.request import Request
    from musicray.train.tune import tune_adapters

    adapters = tune_adapters(config(cache_dir), reference, progress=False)
    assert list(adapters) == list(SUBTASKS)
    for subtask, path in adapters.items():
        settings = json.loads((path / "adapter_config.json").read_text())
        assert settings["r"] == 8 and set(settings["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}

    native, report = Composer(reference).compose(Request("A2", key="D:maj", tempo=100, seed=1))
    assert [report["stages"][t]["adapter"] for t in SUBTASKS] == list(SUBTASKS)

    pytest.importorskip("vllm")
    from musicray.engine.vllm_engine import VllmStages

    stages = VllmStages(reference)    # one engine: the 129,280-token model and all five adapters
    try:
        served, done = asyncio.run(stages.compose_request(Request("A2", key="D:maj", tempo=100, seed=1)))
    finally:
        stages.shutdown()
    assert list(done) == list(SUBTASKS) and all(info["adapter"] == task for task, info in done.items())
    for song, stage_reports in ((native, report["stages"]), (served, done)):
        song.check()
        assert song.n_bars == 2 and song.chords and all(song.tracks[t] for t in ("MELODY", "BRIDGE", "PIANO"))
        assert all(info["grammar_errors"] == 0 for info in stage_reports.values())
