"""musicray.eval.relations' relation of form on real POP909: which bars are copyable, and the copy scores of models
whose answer is known (one that knows every next token, one that knows none)."""

from types import SimpleNamespace

import pytest
import torch

from musicray.eval.relations import _bars_of_answer, copyable_bars, return_copy_scores
from musicray.eval.teacher_forced import held_out_dataset
from musicray.model import add_music_tokens, load_base
from musicray.tokens import Vocabulary


class NextTokenOracle(torch.nn.Module):
    """Logits that put (almost) all probability on the real next token of every row: a model that has learnt
    everything. ``sharpness`` 0 gives the uniform distribution: a model that has learnt nothing."""

    def __init__(self, vocab_size: int, sharpness: float):
        super().__init__()
        self.vocab_size, self.sharpness = vocab_size, sharpness
        self.anchor = torch.nn.Parameter(torch.zeros(1))   # a device to read, as a real model has

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        following = torch.roll(input_ids, -1, dims=1)
        logits.scatter_(2, following.unsqueeze(-1), self.sharpness)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def returning_windows(pop909_prepared, tmp_path_factory):
    """(music tokenizer, POP909's test melody examples in windows of up to 16 bars, rendered at 512 tokens)."""
    data, _ = pop909_prepared
    model, tokenizer = load_base("tiny", tmp_path_factory.mktemp("cache"))
    music = add_music_tokens(model, tokenizer, Vocabulary())
    return music, held_out_dataset(data, "melody", music, 512, 16)


def test_copyable_bars_repeat_their_first_occurrence_token_for_token(returning_windows):
    music, dataset = returning_windows
    total_pairs = total_returning = 0
    for item in dataset.items:
        pairs, returning = copyable_bars(item, music)
        _, tokens, complete = _bars_of_answer(item, music)
        for bar, earlier in pairs:
            assert earlier < bar and {bar, earlier} <= complete
            assert tokens[bar] and tokens[bar] == tokens[earlier]
        assert len(pairs) <= returning
        total_pairs, total_returning = total_pairs + len(pairs), total_returning + returning
    # POP909 repeats many returning bars verbatim (the structure issue: 60 % of melodic sections' bars), not all.
    assert 0.2 < total_pairs / total_returning < 0.9, (total_pairs, total_returning)


@pytest.mark.parametrize("sharpness, expected_p, expected_top", [(60.0, 1.0, 1.0), (0.0, None, 0.0)])
def test_copy_scores_of_a_model_that_knows_all_or_nothing(returning_windows, sharpness, expected_p, expected_top):
    music, dataset = returning_windows
    vocab_size = len(music.tokenizer)
    scores = return_copy_scores(NextTokenOracle(vocab_size, sharpness), music, dataset, batch_size=4,
                                max_examples=6)
    assert scores.examples == 6 and scores.copy_positions > 0 and scores.first_positions > 0
    # What the data holds is counted over every example, not only the six scored.
    assert scores.copyable_bars == sum(len(copyable_bars(item, music)[0]) for item in dataset.items)
    expected_p = 1 / vocab_size if expected_p is None else expected_p
    # Read at the position before each token (an off-by-one would score the oracle's wrong guesses).
    assert scores.copy_p == pytest.approx(expected_p, abs=1e-4)
    assert scores.first_p == pytest.approx(expected_p, abs=1e-4)
    if sharpness:
        assert scores.copy_accuracy == scores.first_accuracy == expected_top
