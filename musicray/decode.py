"""Grammar-masked decoding.

``mask_scores`` is the plain function (scores -> masked scores for one step of a batch); the
``GrammarLogitsProcessor`` wraps it for ``model.generate``; ``generate`` is musicray's own KV-cached loop with a
seed per row, so a request's output does not depend on the requests it was batched with. Each row carries its
own grammar state, stepped once per emitted token (the prefix is never re-parsed); the mask tables live on the
model's device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from musicray.grammar import Grammar, GrammarState, Plan
from musicray.model import MusicTokenizer

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the (masked) distribution."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0            # 0 means no top-k cut
    top_p: float = 1.0        # 1 means no nucleus cut

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature > 0 and self.temperature != 1.0:
            scores = TemperatureLogitsWarper(self.temperature)(None, scores)
        if self.top_k > 0:
            scores = TopKLogitsWarper(self.top_k)(None, scores)
        if self.top_p < 1.0:
            scores = TopPLogitsWarper(self.top_p)(None, scores)
        return scores


def mask_scores(grammar: Grammar, state: GrammarState, scores: torch.Tensor, music: MusicTokenizer) -> torch.Tensor:
    """[batch, llm vocab] scores with everything the grammar forbids at -inf; ``<|eot_id|>`` only after ``<End>``."""
    offset, size = music.offset, len(music.vocab)
    allowed = grammar.mask(state) & ~state.done[:, None]  # after <End> only <|eot_id|> closes the answer
    masked = torch.full_like(scores, NEG_INF)
    masked[:, offset:offset + size] = scores[:, offset:offset + size].masked_fill(~allowed, NEG_INF)
    masked[:, music.eot_id] = torch.where(state.done, scores[:, music.eot_id], torch.full_like(state.done, NEG_INF,
                                                                                                dtype=scores.dtype))
    return masked


def consume(grammar: Grammar, state: GrammarState, tokens: torch.Tensor, music: MusicTokenizer) -> None:
    """Step each row's grammar with its newly emitted LLM token (non-music tokens leave the state as is)."""
    size = len(music.vocab)
    music_ids = tokens.to(grammar.device) - music.offset
    is_music = (music_ids >= 0) & (music_ids < size) & ~state.done
    grammar.step(state, music_ids.clamp(0, size - 1), is_music)


class GrammarLogitsProcessor(LogitsProcessor):
    """For ``model.generate``: masks each row's scores to the tokens its grammar state allows.

    Put it first in ``logits_processor`` (before any temperature/top-k/top-p warper) so that the warpers only
    ever see grammatical tokens.
    """

    def __init__(self, grammar: Grammar, music: MusicTokenizer, streams: list[str], plans: list[Plan],
                 budgets: list[int] | None = None):
        self.grammar, self.music = grammar, music
        self.state = grammar.start(streams, plans, budgets)
        self._prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        else:
            consume(self.grammar, self.state, input_ids[:, -1], self.music)
        return mask_scores(self.grammar, self.state, scores, self.music).to(scores.device)


@dataclass
class Generated:
    tokens: list[list[int]]       # music ids per row, up to and including <End> when the row finished
    finished: list[bool]
    new_tokens: int
    seconds: float          # the whole call: prefill (the prompt's forward pass) and decode loop
    mask_seconds: float
    prefill_seconds: float = 0.0


@torch.no_grad()
def generate(model, music: MusicTokenizer, grammar: Grammar, prompts: list[list[int]], streams: list[str],
             plans: list[Plan], max_new_tokens: list[int], seeds: list[int], sampling: Sampling = Sampling(),
             use_mask: bool = True) -> Generated:
    """Decode a batch of chat-formatted prompts (LLM ids) with the KV cache, one grammar state per row."""
    device = next(model.parameters()).device
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    pad = music.tokenizer.pad_token_id if music.tokenizer.pad_token_id is not None else music.eot_id
    input_ids = torch.full((batch, width), pad, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):  # left padding keeps every row's next token at the same column
        input_ids[i, width - len(prompt):] = torch.tensor(prompt, device=device)
        attention[i, width - len(prompt):] = 1
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    state = grammar.start(streams, plans, max_new_tokens if use_mask else None)
    limit = torch.tensor(max_new_tokens, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max(max_new_tokens)), pad, dtype=torch.long, device=device)
    started, mask_seconds = time.perf_counter(), 0.0
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits_out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache, scores = logits_out.past_key_values, logits_out.logits[:, -1].float()
    prefill_seconds = time.perf_counter() - started
    steps = 0
    for step in range(max(max_new_tokens)):
        if use_mask:
            tick = time.perf_counter()
            scores = mask_scores(grammar, state, scores, music)
            mask_seconds += time.perf_counter() - tick
        scores = sampling.warp(scores)
        tokens = _draw(scores, sampling, generators)
        tokens = torch.where(finished, torch.full_like(tokens, pad), tokens)
        out[:, step] = tokens
        steps = step + 1
        if use_mask:
            tick = time.perf_counter()
            consume(grammar, state, tokens, music)
            mask_seconds += time.perf_counter() - tick
        finished |= (tokens == music.eot_id) | (step + 1 >= limit)
        if bool(finished.all()):
            break
        attention = torch.cat([attention, (~finished).long()[:, None]], dim=1)
        positions = (attention.sum(1, keepdim=True) - 1)
        logits_out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=positions,
                           past_key_values=cache, use_cache=True)
        cache, scores = logits_out.past_key_values, logits_out.logits[:, -1].float()
    rows, done = [], []
    for i in range(batch):
        row = out[i, :steps].tolist()
        if music.eot_id in row:
            row = row[:row.index(music.eot_id)]
        rows.append([t - music.offset for t in row if music.is_music(t)] if use_mask else row)
        done.append(bool(rows[-1]) and rows[-1][-1] == music.vocab.token("End"))
    return Generated(rows, done, steps, time.perf_counter() - started, mask_seconds, prefill_seconds)


def _draw(scores: torch.Tensor, sampling: Sampling, generators: list[torch.Generator]) -> torch.Tensor:
    if sampling.temperature == 0:
        return scores.argmax(-1)
    probs = torch.softmax(scores, dim=-1).cpu()
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]).to(scores.device)
