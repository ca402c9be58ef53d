"""Training data (section windows, rendering) and the grammar-masked loss."""

from pathlib import Path

import pytest
import torch

from musicray.data.layout import DataDir
from musicray.encoding import encode_quantized, round_trip_song
from musicray.grammar import Grammar, validate_examples
from musicray.model import add_music_tokens, load_base
from musicray.quantize import quantized
from musicray.song import SongError
from musicray.tokens import TASKS, Vocabulary
from musicray.train.config import Config, load_config
from musicray.train.data import (
    RenderedDataset, collate, collate_packed, load_examples, pack, packed_batches, validation_examples,
)
from musicray.train.loss import answer_masks, causal_lm_loss
from musicray.windows import section_windows

VOCAB = Vocabulary()
GRAMMAR = Grammar(VOCAB)
CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert path.read_text().startswith("#"), "configs start with their launch command in a comment"


def test_numbers_yaml_reads_as_text_are_coerced(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# musicray train --config c.yaml\nstage1:\n  learning_rate: 1e-3\n  max_steps: '12'\n"
                    "data:\n  max_bars: 4\n")
    config = load_config(path)
    assert config.stage1.learning_rate == 0.001 and config.stage1.max_steps == 12 and config.data.max_bars == 4
    with pytest.raises(SongError, match="stage1.learning_rate: expected a number"):
        load_config(path, ["stage1.learning_rate=fast"])


def test_overrides_and_unknown_keys():
    config = load_config(None, ["stage1.zero_stage=3", "data.max_length=64"])
    assert config.stage1.zero_stage == 3 and config.data.max_length == 64
    with pytest.raises(ValueError, match="stage1: unknown key"):
        load_config(None, ["stage1.zero=3"])
    with pytest.raises(ValueError, match="precision"):
        load_config(None, ["stage1.precision=bf16"])
    assert load_config(None, ["eval.sampling.melody.temperature=0.8"]).eval.sampling == {"melody": {"temperature": 0.8}}
    with pytest.raises(SongError, match="eval.sampling: melody.temperature: -1 is not"):
        load_config(None, ["eval.sampling.melody.temperature=-1"])


def test_section_windows_keep_the_grammar_and_round_trip(synthetic_songs):
    for song in synthetic_songs[:10]:
        song = quantized(song, VOCAB)
        windows = section_windows(song, 8)
        assert sum(w.n_bars for w in windows) == song.n_bars
        assert [s for w in windows for s in w.sections] == song.sections
        assert sum(len(n) for w in windows for n in w.tracks.values()) == sum(len(n) for n in song.tracks.values())
        examples = [encode_quantized(w, task, VOCAB) for w in windows for task in TASKS]
        assert all(not any(e.values()) for e in validate_examples(GRAMMAR, examples))
        for window in windows:
            window.check()
            expected, decoded = round_trip_song(window, "song", VOCAB)
            assert decoded == expected


def test_load_examples_teaches_chords_with_and_without_a_melody(tmp_path, synthetic_songs):
    import json

    import pandas as pd

    from musicray.song import song_to_dict

    songs = [quantized(s, VOCAB) for s in synthetic_songs[:3]]
    pd.DataFrame([{"song_id": s.song_id, "split": "test", "song_json": json.dumps(song_to_dict(s))} for s in songs]
                 ).to_parquet(DataDir(tmp_path).songs)
    examples = load_examples(tmp_path, ["chord", "melody"], "test", VOCAB, max_bars=8)
    windows = [w for s in songs for w in section_windows(s, 8)]
    with_melody = [w for w in windows if w.tracks["MELODY"]]
    assert 0 < len(with_melody) <= len(windows)
    chord_inputs = [[VOCAB.tokens[t] for t in e.prompt if VOCAB.family[t] == "Input"]
                    for e in examples if e.task == "chord"]
    assert chord_inputs.count([]) == len(windows) and chord_inputs.count(["<Input_melody>"]) == len(with_melody)
    assert sum(e.task == "melody" for e in examples) == len(windows)
    assert all(not any(e.values()) for e in validate_examples(GRAMMAR, examples))


@pytest.fixture(scope="module")
def batch(tmp_path_factory, synthetic_songs):
    model, tokenizer = load_base("tiny", tmp_path_factory.mktemp("cache"))
    music = add_music_tokens(model, tokenizer, VOCAB)
    windows = [w for s in synthetic_songs[:2] for w in section_windows(quantized(s, VOCAB), 4)]
    examples = [encode_quantized(w, task, VOCAB) for w in windows[:2] for task in TASKS]
    dataset = RenderedDataset(examples, music, max_length=1024)
    return model, music, collate(dataset.items, tokenizer.pad_token_id)


def test_masked_loss_gives_illegal_tokens_no_probability(batch):
    model, music, b = batch
    masks = answer_masks(GRAMMAR, b["labels"], b["answer_start"], b["streams"], b["plans"], music.offset)
    labels = b["labels"]
    music_positions = (labels >= music.offset) & (labels < music.offset + len(VOCAB))
    # every music label is allowed where it stands, and nowhere else is a mask set
    assert bool(masks[music_positions].any(-1).all())
    assert bool(masks[music_positions].gather(1, (labels[music_positions] - music.offset)[:, None]).all())
    assert not bool(masks[~music_positions].any())
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    masked = causal_lm_loss(logits, labels, GRAMMAR, b["answer_start"], b["streams"], b["plans"], music.offset,
                            music.eot_id)
    plain = causal_lm_loss(logits, labels)
    assert masked.item() < plain.item()  # renormalised over the allowed tokens only
    masked.backward()
    grad = model.get_output_embeddings().weight.grad
    # rows of tokens never allowed anywhere in the batch get no gradient from the masked loss
    never = ~masks.any(0).any(0)
    assert bool((grad[music.offset:][never].abs().sum(-1) == 0).all())


def test_rendered_dataset_cuts_long_answers_and_drops_prompts_that_do_not_fit(batch, synthetic_songs):
    _, music, _ = batch
    example = encode_quantized(quantized(synthetic_songs[3], VOCAB), "dynamics", VOCAB)
    full = len(music.render(example)[0])
    cut = RenderedDataset([example], music, max_length=full - 10)
    assert len(cut) == 1 and len(cut[0].input_ids) == full - 10
    none = RenderedDataset([example], music, max_length=20)
    assert len(none) == 0 and none.dropped == 1


@pytest.fixture(scope="module")
def packed(batch, synthetic_songs):
    """The batch fixture's examples (and two more) packed into rows of 640 tokens."""
    model, music, _ = batch
    windows = [w for s in synthetic_songs[:2] for w in section_windows(quantized(s, VOCAB), 4)]
    examples = [encode_quantized(w, task, VOCAB) for w in windows[:3] for task in TASKS]
    dataset = RenderedDataset(examples, music, max_length=640)
    return model, music, dataset, pack(dataset.items, 640)


def test_pack_fills_rows_without_splitting_or_losing_an_example(packed):
    _, _, dataset, rows = packed
    assert sorted(id(item) for row in rows for item in row) == sorted(id(item) for item in dataset.items)
    assert all(sum(len(i.input_ids) for i in row) <= 640 for row in rows)
    # first-fit: no example of a later row would have fitted into an earlier row when it was placed; in the end
    # only the last rows may be far from full
    used = [sum(len(i.input_ids) for i in row) for row in rows]
    assert sum(used[:-2]) > 0.85 * 640 * len(used[:-2])
    assert len(rows) < len(dataset.items)


def test_packed_rows_give_each_example_its_own_logits_and_the_same_loss(packed):
    """Attention stays inside each example (positions restart), so packed logits equal the example's own, and the
    plain and grammar-masked losses equal those of the padded batch of the same examples."""
    model, music, dataset, rows = packed
    pad = music.tokenizer.pad_token_id
    b = collate_packed(rows[:2], pad)
    assert b["tokens"] == sum(len(i.input_ids) for row in rows[:2] for i in row)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        first_row = rows[0]
        at = 0
        for item in first_row:
            alone = model(input_ids=torch.tensor([item.input_ids])).logits[0]
            assert torch.allclose(logits[0, at:at + len(item.input_ids)], alone, atol=1e-4)
            at += len(item.input_ids)
        items = [i for row in rows[:2] for i in row]
        padded = collate(items, pad)
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    assert float(causal_lm_loss(logits, b["labels"])) == pytest.approx(
        float(causal_lm_loss(padded_logits, padded["labels"])), rel=5e-4)
    masked = causal_lm_loss(logits, b["labels"], GRAMMAR, b["answer_start"], b["streams"], b["plans"], music.offset,
                            music.eot_id, b["segment_rows"])
    masked_padded = causal_lm_loss(padded_logits, padded["labels"], GRAMMAR, padded["answer_start"],
                                   padded["streams"], padded["plans"], music.offset, music.eot_id)
    assert float(masked) == pytest.approx(float(masked_padded), rel=5e-4)
    # every music label of every packed answer is allowed by its own answer's grammar state
    masks = answer_masks(GRAMMAR, b["labels"], b["answer_start"], b["streams"], b["plans"], music.offset,
                         b["segment_rows"])
    labels = b["labels"]
    music_positions = (labels >= music.offset) & (labels < music.offset + len(VOCAB))
    assert bool(masks[music_positions].gather(1, (labels[music_positions] - music.offset)[:, None]).all())
    assert not bool(masks[~music_positions].any())


def test_packed_batches_split_the_rows_by_rank(packed):
    _, _, dataset, _ = packed
    first = [next(packed_batches(dataset, 1, 640, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert first[0] != first[1]
    assert all(sum(len(i.input_ids) for i in batch[0]) <= 640 for batch in first)


def test_train_on_inputs_labels_the_prompt_music_and_keeps_the_answer_start(batch, synthetic_songs):
    _, music, _ = batch
    example = encode_quantized(quantized(synthetic_songs[3], VOCAB), "melody", VOCAB)
    plain, with_inputs = (RenderedDataset([example], music, 4096, train_on_inputs=flag)[0] for flag in (False, True))
    assert plain.answer_start == with_inputs.answer_start and plain.input_ids == with_inputs.input_ids
    assert sum(x != -100 for x in with_inputs.labels) == sum(x != -100 for x in plain.labels) + len(example.prompt)
    with pytest.raises(SongError, match="stage1.train_on_inputs"):
        load_config(None, ["stage1.train_on_inputs=true", "stage1.mask_loss=true"])


# Synthetic song ids and the splits their ids hash into (musicray.data.prepare.split_of).
VALIDATION_CASES = {
    "no prepared table": (None, "no such table"),
    "no song in the validation split": (("synth-0000", "synth-0001"), "no songs in its validation split"),
    "a validation song": (("synth-0001", "synth-0007"), None),
}


@pytest.mark.parametrize("song_ids, why", VALIDATION_CASES.values(), ids=VALIDATION_CASES.keys())
def test_validation_examples_say_why_there_are_none(tmp_path, song_ids, why):
    from musicray.data.prepare import SynthSource, prepare_one, write_tables

    if song_ids is not None:
        source = SynthSource(8)
        write_tables([prepare_one(source, song_id, VOCAB) for song_id in song_ids], tmp_path, VOCAB)
    examples, missing = validation_examples(tmp_path, ["melody"], VOCAB, 4)
    if why is None:
        assert examples and missing is None and {e.task for e in examples} == {"melody"}
    else:
        assert examples == [] and why in missing
