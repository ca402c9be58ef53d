"""The causal-LM loss on answer tokens, optionally under the grammar's allowed-token mask.

With ``grammar`` given, each answer position's distribution is renormalised over the tokens the grammar
allows there (the music tokens its automaton permits, or ``<|eot_id|>`` right after ``<End>``): the thesis'
training-time logits masking. The masks are computed for the whole batch at once on the logits' device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from musicray.grammar import Grammar, small_tensor_threads


def answer_masks(grammar: Grammar, labels: torch.Tensor, answer_start: torch.Tensor, streams: list[str],
                 plans: list, offset: int, segment_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, seq, music vocab] bool: the grammar's allowed music tokens for the label at each position.

    One grammar state per answer: answer k starts at ``answer_start[k]`` in row ``segment_rows[k]`` (row k when
    not given: one example per row) and runs while its labels are music tokens (packed rows hold several)."""
    batch, length = labels.shape
    n_music = len(grammar.vocab)
    masks = torch.zeros((batch, length, n_music), dtype=torch.bool, device=labels.device)
    state = grammar.start(streams, plans)
    rows = (torch.arange(batch) if segment_rows is None else segment_rows).to(labels.device)
    position = answer_start.to(labels.device).clone()
    reading = torch.ones(len(rows), dtype=torch.bool, device=labels.device)
    for _ in range(int((length - answer_start.min()).item())):
        inside = position < length
        at = position.clamp(max=length - 1)
        label = labels[rows, at]
        is_music = reading & inside & (label >= offset) & (label < offset + n_music)
        reading = is_music   # an answer ends at its first non-music label (<|eot_id|>): the next one follows
        if not bool(is_music.any()):
            break
        masks[rows[is_music], at[is_music]] = grammar.mask(state)[is_music]
        grammar.step(state, (label - offset).clamp(0, n_music - 1), is_music)
        position = position + 1
    return masks


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, grammar: Grammar | None = None,
                   answer_start: torch.Tensor | None = None, streams: list[str] | None = None,
                   plans: list | None = None, offset: int = 0, eot_id: int | None = None,
                   segment_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens (shifted: logits at t predict labels at t+1)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    if grammar is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    n_music = len(grammar.vocab)
    with small_tensor_threads(labels.device), torch.no_grad():
        music_masks = answer_masks(grammar, labels, answer_start, streams, plans, offset, segment_rows)[:, 1:]
    labelled = targets != -100
    selected = logits[labelled]                        # [N, V]
    target = targets[labelled]
    music_allowed = music_masks[labelled]              # [N, n_music]
    is_music = (target >= offset) & (target < offset + n_music)
    # A non-music label in the answer is the closing <|eot_id|>: only it is allowed there.
    allowed_eot = ~is_music if eot_id is not None else torch.zeros_like(is_music)
    music_logits = selected[:, offset:offset + n_music].masked_fill(~music_allowed, float("-inf"))
    eot_logits = selected[:, eot_id:eot_id + 1] if eot_id is not None else selected[:, :1]
    eot_logits = eot_logits.masked_fill(~allowed_eot[:, None], float("-inf"))
    normaliser = torch.logsumexp(torch.cat([music_logits, eot_logits], dim=-1), dim=-1)
    target_logit = selected.gather(1, target[:, None])[:, 0]
    return (normaliser - target_logit).mean()
