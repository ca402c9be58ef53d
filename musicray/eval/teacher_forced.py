"""Teacher-forced scores of a sub-task on held-out examples: the training loss and next-token accuracy.

The examples are the training pipeline's own (``musicray.train.data``: section windows of the split's songs,
rendered through the chat template, cut to ``max_length``), so the scores are those training optimises, on songs
it never saw. Only answer tokens count (the target stream and its closing ``<|eot_id|>``).

Two views of each score:

* plain: the loss of ``musicray.train.loss.causal_lm_loss`` without the grammar, and argmax accuracy over the
  whole LLM vocabulary;
* under the grammar: the loss renormalised over the tokens the grammar allows at each answer position (the
  thesis' training-time logits mask, ``stage1.mask_loss``), and argmax accuracy among those tokens. A model
  trained with the masked loss never learns to avoid ungrammatical tokens, so its plain scores say little; this
  view compares such a model fairly with one trained without the mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from musicray.grammar import Grammar, small_tensor_threads
from musicray.model import MusicTokenizer
from musicray.song import SongError
from musicray.train.data import DEFAULT_MAX_BARS, RenderedDataset, collate, load_examples
from musicray.train.loss import answer_masks, causal_lm_loss


@dataclass
class Scores:
    loss: float                  # mean cross-entropy per answer token (nats)
    accuracy: float              # argmax over the whole vocabulary == the next answer token
    masked_loss: float           # the same under the grammar's allowed-token mask
    masked_accuracy: float       # argmax among the allowed tokens
    tokens: int                  # answer tokens scored
    examples: int

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_dataset(data_dir: str | Path, subtask: str, music: MusicTokenizer, max_length: int,
                     max_bars: int | None = DEFAULT_MAX_BARS, max_examples: int | None = None,
                     split: str = "test") -> RenderedDataset:
    """The split's examples of a sub-task, windowed (``max_bars``) and rendered (``max_length``) as for training;
    the first ``max_examples`` of them in song order."""
    examples = load_examples(data_dir, [subtask], split, music.vocab, max_bars)
    if max_examples:
        examples = examples[:max_examples]
    dataset = RenderedDataset(examples, music, max_length)
    if len(dataset) == 0:
        raise SongError(f"--data: {data_dir} has no {subtask} example in its {split} split that fits "
                        f"data.max_length={max_length} ({len(examples)} examples before rendering)")
    return dataset


def _grammar_allowed(grammar: Grammar, batch: dict, labels: torch.Tensor, music: MusicTokenizer,
                     vocab_size: int) -> torch.Tensor:
    """[batch, seq-1, LLM vocab] bool: the tokens allowed where each next label is predicted (loss.py's rule:
    the grammar's music tokens at a music label, only ``<|eot_id|>`` at the closing label)."""
    with small_tensor_threads(labels.device):
        music_allowed = answer_masks(grammar, labels, batch["answer_start"], batch["streams"], batch["plans"],
                                     music.offset)[:, 1:]
    targets = labels[:, 1:]
    allowed = torch.zeros((*targets.shape, vocab_size), dtype=torch.bool, device=labels.device)
    allowed[..., music.offset:music.offset + len(music.vocab)] = music_allowed
    is_music = (targets >= music.offset) & (targets < music.offset + len(music.vocab))
    allowed[..., music.eot_id] = (targets != -100) & ~is_music
    return allowed


@torch.no_grad()
def teacher_forced(model, music: MusicTokenizer, dataset: RenderedDataset, grammar: Grammar,
                   batch_size: int = 4) -> Scores:
    """Token-weighted scores of ``model`` (in whatever adapter state it is in) over ``dataset``."""
    if batch_size < 1:
        raise SongError(f"batch_size: {batch_size}; expected at least 1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad_id = music.tokenizer.pad_token_id if music.tokenizer.pad_token_id is not None else music.eot_id
    loss_sum = masked_loss_sum = 0.0
    correct = masked_correct = count = 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate(dataset.items[start:start + batch_size], pad_id)
            labels = batch["labels"].to(device)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits.float()
            labelled = labels[:, 1:] != -100
            n = int(labelled.sum())
            if n == 0:
                continue
            # causal_lm_loss returns the mean over the batch's answer tokens; weight it back by their count.
            loss_sum += float(causal_lm_loss(logits, labels)) * n
            masked_loss_sum += float(causal_lm_loss(logits, labels, grammar, batch["answer_start"], batch["streams"],
                                                    batch["plans"], music.offset, music.eot_id)) * n
            scores, targets = logits[:, :-1][labelled], labels[:, 1:][labelled]
            correct += int((scores.argmax(-1) == targets).sum())
            allowed = _grammar_allowed(grammar, batch, labels, music, logits.shape[-1])[labelled]
            masked_correct += int((scores.masked_fill(~allowed, float("-inf")).argmax(-1) == targets).sum())
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise SongError("teacher-forced scores: no answer token to score (every example was cut away)")
    return Scores(loss_sum / count, correct / count, masked_loss_sum / count, masked_correct / count, count,
                  len(dataset))
