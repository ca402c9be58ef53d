"""Teacher-forced loss and accuracy: alignment, token weighting, the grammar view, held-out examples."""

import pytest
import torch

from musicray.eval.teacher_forced import held_out_dataset, teacher_forced
from musicray.grammar import Grammar
from musicray.model import load_music_model
from musicray.run import RunDir
from musicray.song import SongError
from musicray.train.data import collate
from musicray.train.loss import causal_lm_loss

from .conftest import TRAIN_SONGS, write_data


@pytest.fixture(scope="module")
def model(eval_run):
    return load_music_model(RunDir(eval_run).stage1_model)


@pytest.fixture(scope="module")
def dataset(model, eval_data):
    return held_out_dataset(eval_data, "melody", model[1], 512, 8, max_examples=5)


class Oracle(torch.nn.Module):
    """Logits that put the next input token far ahead: teacher forcing's perfect model."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))   # gives the scorer a device to read

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros((*input_ids.shape, self.vocab_size))
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 50.0)
        return type("Out", (), {"logits": logits})()


def test_a_model_that_knows_the_next_token_scores_perfectly(model, dataset):
    _, music = model
    scores = teacher_forced(Oracle(len(music.tokenizer)), music, dataset, Grammar(music.vocab), batch_size=2)
    assert scores.accuracy == 1.0 and scores.masked_accuracy == 1.0
    assert scores.loss < 1e-6 and scores.masked_loss < 1e-6


def test_scores_count_answer_tokens_and_do_not_depend_on_batching(model, dataset):
    net, music = model
    grammar = Grammar(music.vocab)
    one_batch = teacher_forced(net, music, dataset, grammar, batch_size=len(dataset))
    small_batches = teacher_forced(net, music, dataset, grammar, batch_size=2)
    assert one_batch.examples == small_batches.examples == 5
    assert one_batch.tokens == small_batches.tokens == sum(sum(l != -100 for l in item.labels[1:])
                                                           for item in dataset.items)
    for field in ("loss", "accuracy", "masked_loss", "masked_accuracy"):
        assert getattr(small_batches, field) == pytest.approx(getattr(one_batch, field), rel=1e-5)
    # The loss is loss.py's over the whole set at once.
    batch = collate(dataset.items, music.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert one_batch.loss == pytest.approx(float(causal_lm_loss(logits, batch["labels"])), rel=1e-5)
    assert one_batch.masked_loss == pytest.approx(float(causal_lm_loss(
        logits, batch["labels"], grammar, batch["answer_start"], batch["streams"], batch["plans"], music.offset,
        music.eot_id)), rel=1e-5)
    labelled = batch["labels"][:, 1:] != -100
    manual = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:])[labelled].float().mean()
    assert one_batch.accuracy == pytest.approx(float(manual))


def test_the_grammar_view_can_only_help(model, dataset):
    net, music = model
    scores = teacher_forced(net, music, dataset, Grammar(music.vocab))
    # Renormalising over allowed tokens that include the (grammatical) target lowers its loss and keeps every hit.
    assert scores.masked_loss < scores.loss
    assert scores.accuracy <= scores.masked_accuracy


def test_the_models_training_mode_is_restored(model, dataset):
    net, music = model
    net.train()
    try:
        teacher_forced(net, music, dataset, Grammar(music.vocab))
        assert net.training
    finally:
        net.eval()


def test_held_out_examples_and_their_errors(model, eval_data, tmp_path):
    _, music = model
    assert len(held_out_dataset(eval_data, "chord", music, 512, 8)) > len(held_out_dataset(eval_data, "chord", music,
                                                                                           512, 8, max_examples=3))
    with pytest.raises(SongError, match="no melody example in its test split that fits data.max_length=20"):
        held_out_dataset(eval_data, "melody", music, 20, 8)
    write_data(tmp_path / "train-only", TRAIN_SONGS)
    with pytest.raises(SongError, match="test split"):
        held_out_dataset(tmp_path / "train-only", "melody", music, 512, 8)
