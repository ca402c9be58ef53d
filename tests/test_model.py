"""The base model and its music tokens: the tiny preset goes through save_pretrained/from_pretrained."""

import json

import pytest
import torch

from musicray.encoding import encode
from musicray.model import (INSTRUCTIONS, MusicTokenizer, add_music_tokens, build_tiny, load_base, load_music_model,
                            prepare_for_training, resolve_base, save_music_model)
from musicray.song import SongError
from musicray.tokens import TASKS, Vocabulary

VOCAB = Vocabulary()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base("tiny", tmp_path_factory.mktemp("cache"))


def test_tiny_preset_is_a_saved_pretrained_llama(tmp_path):
    path = resolve_base("tiny", tmp_path)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    assert (path / "tokenizer.json").exists()
    assert resolve_base("tiny", tmp_path) == path  # built once


def test_tiny_preset_has_a_head_dim_vllm_serves(tmp_path):
    """vLLM's CPU attention refuses head_dim 16 and serves 64; a cached tiny model of an older shape is rebuilt."""
    path = resolve_base("tiny", tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    config["num_attention_heads"] = 4   # the shape before head_dim 64
    (path / "config.json").write_text(json.dumps(config))
    assert json.loads((resolve_base("tiny", tmp_path) / "config.json").read_text())["num_attention_heads"] == 1


def test_a_missing_base_model_directory_is_named(tmp_path):
    with pytest.raises(SongError, match="base_model"):
        resolve_base(str(tmp_path / "Llama-3.1-8B-Instruct"), tmp_path)


def test_music_tokens_are_one_id_each_and_contiguous(base):
    model, tokenizer = base
    text_size = len(tokenizer)
    old_rows = model.get_input_embeddings().weight[:text_size].detach().clone()
    music = add_music_tokens(model, tokenizer, VOCAB)
    assert music.offset == text_size and len(tokenizer) == text_size + len(VOCAB)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert torch.equal(model.get_input_embeddings().weight[:text_size], old_rows)
    # every token string is one id; a concatenation tokenizes to exactly those ids
    text = "<Sec_A8><Bar><Pos_0><Chord_I:maj><Rel_60><Dur_4>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == music.to_llm(VOCAB.parse(text))
    # new rows start near the mean of the old ones (mean resizing), not at zero or far away
    new_rows = model.get_input_embeddings().weight[text_size:].detach()
    assert torch.allclose(new_rows.mean(0), old_rows.mean(0), atol=0.05)


def test_render_labels_only_the_answer(base, synthetic_songs):
    model, tokenizer = base
    music = MusicTokenizer(tokenizer, VOCAB) if "<Bar>" in tokenizer.get_vocab() else \
        add_music_tokens(model, tokenizer, VOCAB)
    for task in TASKS:
        example = encode(synthetic_songs[0], task, VOCAB)
        input_ids, labels = music.render(example)
        answer = [x for x in labels if x != -100]
        assert answer == music.to_llm(example.target) + [music.eot_id]
        assert input_ids[len(input_ids) - len(answer):] == answer
        prompt_text = tokenizer.decode(input_ids[:len(input_ids) - len(answer)])
        assert INSTRUCTIONS[task] in prompt_text and "<|start_header_id|>assistant<|end_header_id|>" in prompt_text
        # train_on_inputs: the same ids; the prompt's music tokens are labelled too, the chat text is not
        same_ids, with_inputs = music.render(example, train_on_inputs=True)
        assert same_ids == input_ids
        assert [x for x in with_inputs if x != -100] == music.to_llm(example.prompt + example.target) + [music.eot_id]


def test_save_and_load_music_model(tmp_path, base):
    model, tokenizer = base
    music = MusicTokenizer(tokenizer, VOCAB) if "<Bar>" in tokenizer.get_vocab() else \
        add_music_tokens(model, tokenizer, VOCAB)
    save_music_model(model, music, tmp_path / "m")
    loaded, loaded_music = load_music_model(tmp_path / "m")
    assert loaded_music.offset == music.offset and loaded_music.vocab.tokens == VOCAB.tokens
    ids = torch.tensor([music.to_llm(VOCAB.parse("<Sec_A8><Bar><Pos_0>"))])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_build_tiny_is_deterministic(tmp_path):
    a, b = build_tiny(tmp_path / "a"), build_tiny(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_prompt_ids_equal_the_chat_template_for_every_task(synthetic_songs):
    """The cached template frame around the music tokens gives exactly what the tokenizer's chat template gives."""
    import tempfile

    from musicray.encoding import encode
    from musicray.model import add_music_tokens, load_base
    from musicray.quantize import quantized
    from musicray.streams import OPTIONAL_INPUTS
    from musicray.tokens import TASKS
    from musicray.windows import section_windows

    model, tokenizer = load_base("tiny", tempfile.mkdtemp())
    music = add_music_tokens(model, tokenizer, VOCAB)
    checked = 0
    for song in synthetic_songs[:3]:
        for window in section_windows(quantized(song, VOCAB), 4)[:3]:
            for task in TASKS:
                for optional in [(), *((name,) for name in OPTIONAL_INPUTS.get(task, ()))]:
                    example = encode(window, task, VOCAB, optional)
                    assert music.prompt_ids(example) == music.chat_prompt_ids(example)
                    checked += 1
    assert checked >= 40


def test_the_cache_dir_of_a_built_in_model_expands_home(tmp_path, monkeypatch):
    from musicray.model import resolve_base

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    path = resolve_base("tiny", "~/cache")
    assert path == tmp_path / "cache" / "tiny-llama" and not (tmp_path / "~").exists()


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def one_step(model, input_ids) -> tuple[float, dict, int]:
    """Loss, gradients and the number of tensors autograd kept for the backward pass, of one training step."""
    from musicray.train.loss import causal_lm_loss

    kept = []
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(1) or t, lambda t: t):
        loss = causal_lm_loss(model(input_ids=input_ids).logits, input_ids)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, len(kept)


@pytest.mark.parametrize("wrap", [lambda model: model, with_lora], ids=["stage 1: full model", "stage 2: LoRA"])
def test_gradient_checkpointing_keeps_the_loss_and_gradients_and_keeps_fewer_activations(tmp_path, wrap):
    steps = {}
    for checkpointing in (False, True):
        model, _ = load_base("tiny", tmp_path)
        input_ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)     # the same LoRA initialisation
        steps[checkpointing] = one_step(wrap(prepare_for_training(model, checkpointing)), input_ids)
    (loss, grads, kept), (loss_ckpt, grads_ckpt, kept_ckpt) = steps[False], steps[True]
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6)
    # Recomputed in the backward pass: each checkpointed layer keeps its input only.
    assert kept_ckpt < kept / 2
