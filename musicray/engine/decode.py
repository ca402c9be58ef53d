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
from transformers import LogitsProcessor

from musicray.grammar import Grammar, GrammarState, Plan
from musicray.model import MusicTokenizer
from musicray.sampling import Sampling

NEG_INF = float("-inf")
# A jump-forward iteration steps the whole batch's grammar (a fixed cost per step: Python rows up to Grammar.row_batch,
# ~150 small tensor ops above), so it continues only while at
# least this share of the unfinished rows has a forced token: in ordinary generation a row or two of a batch is in
# a short forced run at any step (jumping them all cost 6x the grammar steps for 25 % fewer model calls at batch 32);
# in infilling the given bars line up across rows and the whole batch jumps.
JUMP_QUORUM = 0.5


def allowed_music(grammar: Grammar, state: GrammarState) -> torch.Tensor:
    """[batch, music vocab] bool: the music tokens each row may emit next (none once it has ended)."""
    return grammar.mask(state) & ~state.done[:, None]


def allowed_tokens(grammar: Grammar, state: GrammarState, music: MusicTokenizer, vocab_size: int,
                   music_allowed: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, llm vocab] bool: what each row may emit next (its grammar's music tokens; ``<|eot_id|>`` after
    ``<End>``). ``music_allowed`` is ``allowed_music``'s answer when the caller already has it."""
    offset, size = music.offset, len(music.vocab)
    allowed = torch.zeros((state.node.shape[0], vocab_size), dtype=torch.bool, device=grammar.device)
    allowed[:, offset:offset + size] = allowed_music(grammar, state) if music_allowed is None else music_allowed
    allowed[:, music.eot_id] = state.done
    return allowed


def only_choice(state: GrammarState, music_allowed: torch.Tensor, music: MusicTokenizer
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose grammar allows exactly one token, and that token (LLM id; ``<|eot_id|>`` once a row has ended),
    counted on the music slice rather than the whole LLM vocabulary (128k columns for LLaMA 3)."""
    only = (music_allowed.sum(-1) == 1) | state.done
    token = torch.where(state.done, music.eot_id, music_allowed.float().argmax(-1) + music.offset)
    return only, token


def mask_scores(grammar: Grammar, state: GrammarState, scores: torch.Tensor, music: MusicTokenizer) -> torch.Tensor:
    """[batch, llm vocab] scores with everything the grammar forbids at -inf; ``<|eot_id|>`` only after ``<End>``."""
    allowed = allowed_tokens(grammar, state, music, scores.shape[-1]).to(scores.device)
    return scores.masked_fill(~allowed, NEG_INF)


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
    new_tokens: int         # the longest row's tokens (decode steps a token-by-token loop would take)
    seconds: float          # the whole call: prefill (the prompt's forward pass) and decode loop
    mask_seconds: float
    prefill_seconds: float = 0.0
    forward_calls: int = 0  # model calls after the prefill (jump-forward feeds a forced run in one)


@torch.no_grad()
def generate(model, music: MusicTokenizer, grammar: Grammar, prompts: list[list[int]], streams: list[str],
             plans: list[Plan], max_new_tokens: list[int], seeds: list[int], sampling: Sampling = Sampling(),
             use_mask: bool = True, jump_forward: bool = True) -> Generated:
    """Decode a batch of chat-formatted prompts (LLM ids) with the KV cache, one grammar state per row.

    A token the grammar leaves no choice for is taken without drawing (so a row's random stream is spent on
    choices only). With ``jump_forward``, a run of such tokens (a given bar, the closing ``<End>``) is fed to
    the model in one forward pass with the token before it instead of one pass per token; the tokens and
    distributions are those of the step-by-step loop (``jump_forward=False``), up to float rounding.
    """
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
    emitted = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max(max_new_tokens)), pad, dtype=torch.long, device=device)
    started, mask_seconds, forward_calls = time.perf_counter(), 0.0, 0
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    logits_out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache, scores = logits_out.past_key_values, logits_out.logits[:, -1].float()
    prefill_seconds = time.perf_counter() - started
    vocab_size = scores.shape[-1]
    music_allowed = None   # the grammar's verdict for the current state, when the jump-forward loop already has it
    while True:
        if use_mask:
            tick = time.perf_counter()
            music_allowed = allowed_music(grammar, state) if music_allowed is None else music_allowed
            allowed = allowed_tokens(grammar, state, music, vocab_size, music_allowed).to(device)
            only, only_token = only_choice(state, music_allowed, music)
            mask_seconds += time.perf_counter() - tick
            scores = scores.masked_fill(~allowed, NEG_INF)
        else:
            only = torch.zeros(batch, dtype=torch.bool, device=device)
            only_token = torch.zeros(batch, dtype=torch.long, device=device)
        drawn = _draw(sampling.warp(scores), sampling, generators, ~only & ~finished)
        tokens = torch.where(only, only_token.to(device), drawn)
        fed_tokens, fed_rows = [tokens], [~finished]
        finished, emitted = _emit(tokens, ~finished, finished, emitted, limit, out, music)
        music_allowed = None
        if use_mask:
            tick = time.perf_counter()
            consume(grammar, state, tokens, music)
            running = ~finished
            while jump_forward and bool(running.any()):   # extend each row by the tokens it has no choice over
                music_allowed = allowed_music(grammar, state)
                only, only_token = only_choice(state, music_allowed, music)
                running = running & only.to(device) & (emitted < limit)
                if int(running.sum()) < JUMP_QUORUM * int((~finished).sum()):
                    break   # too few rows gain: they take their forced token in the next ordinary step
                forced = torch.where(running, only_token.to(device), pad)
                fed_tokens.append(forced)
                fed_rows.append(running)
                finished, emitted = _emit(forced, running, finished, emitted, limit, out, music)
                consume(grammar, state, torch.where(running, forced, music.eot_id), music)
                running = running & ~finished
                music_allowed = None
            mask_seconds += time.perf_counter() - tick
        if bool(finished.all()):
            break
        fed, real = torch.stack(fed_tokens, 1), torch.stack(fed_rows, 1)    # [batch, tokens this pass]
        attention = torch.cat([attention, real.long()], dim=1)
        positions = attention.cumsum(1)[:, -fed.shape[1]:] - 1
        logits_out = model(input_ids=fed, attention_mask=attention, position_ids=positions,
                           past_key_values=cache, use_cache=True)
        forward_calls += 1
        last = real.long().cumsum(1).argmax(1)   # each row's last fed token: its next distribution
        cache = logits_out.past_key_values
        scores = logits_out.logits[torch.arange(batch, device=device), last].float()
    done, rows_out = [], [out[i, :n].tolist() for i, n in enumerate(emitted.tolist())]
    for i, row in enumerate(rows_out):
        if music.eot_id in row:
            row = row[:row.index(music.eot_id)]
        rows_out[i] = [t - music.offset for t in row if music.is_music(t)] if use_mask else row
        done.append(bool(rows_out[i]) and rows_out[i][-1] == music.vocab.token("End"))
    return Generated(rows_out, done, int(emitted.max()), time.perf_counter() - started, mask_seconds,
                     prefill_seconds, forward_calls)


def _emit(tokens: torch.Tensor, rows: torch.Tensor, finished: torch.Tensor, emitted: torch.Tensor,
          limit: torch.Tensor, out: torch.Tensor, music: MusicTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each of ``rows``' token at its next place in ``out``; a row finishes at ``<|eot_id|>`` or its
    token limit."""
    rows = rows & ~finished
    index = rows.nonzero().flatten()
    out[index, emitted[index]] = tokens[index]
    emitted = emitted + rows.long()
    finished = finished | (rows & ((tokens == music.eot_id) | (emitted >= limit)))
    return finished, emitted


def _draw(scores: torch.Tensor, sampling: Sampling, generators: list[torch.Generator],
          rows: torch.Tensor) -> torch.Tensor:
    """A sampled token per row; only ``rows`` draw (and spend their generator), the others get the argmax."""
    if sampling.temperature == 0:
        return scores.argmax(-1)
    tokens = scores.argmax(-1).cpu()
    probs = torch.softmax(scores, dim=-1).cpu()
    for i in torch.nonzero(rows.cpu()).flatten().tolist():
        tokens[i] = torch.multinomial(probs[i], 1, generator=generators[i])[0]
    return tokens.to(scores.device)
