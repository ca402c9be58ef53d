"""The music grammar as a vLLM v1 logits processor: the same tables and state as musicray's own decoding loop.

vLLM builds one ``GrammarLogitsProcessor`` per engine (in its model-runner process) and calls it every step:
``update_state`` with the changes of the running batch (requests added, removed, moved) and ``apply`` with the
batch's logits. A request opts in with ``SamplingParams(extra_args={"musicray_grammar": grammar_args(...)})``
carrying its stream, its grammar plan and its token budget; every other request passes unmasked.

Each opted-in row keeps its own ``GrammarState`` row (``musicray.grammar``: the grammar is data, compiled once),
stepped with the tokens the engine appended to the request's output since the last step, so a row never
re-parses its prefix. All rows live in one batched state, rebuilt (``GrammarState.take`` / ``concat_states``)
only when the batch's makeup changes; the mask of the whole batch is then one call of the native loop's
``allowed_tokens``. Rows mask exactly as ``musicray.engine.decode.generate`` does: music tokens by the grammar, the
end-of-turn token only after ``<End>``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from musicray.engine.decode import NEG_INF, allowed_tokens, consume
from musicray.grammar import STREAM_NAMES, Grammar, GrammarState, Plan, concat_states
from musicray.model import MUSICRAY_JSON
from musicray.song import MAX_SECTION_BARS, SECTION_LABELS, Section, SongError
from musicray.tokens import Vocabulary

EXTRA_ARGS_KEY = "musicray_grammar"
STATS_ENV = "MUSICRAY_GRAMMAR_STATS"
FQCN = "musicray.engine.grammar_processor:GrammarLogitsProcessor"


def grammar_args(stream: str, plan: Plan, budget: int) -> dict:
    """What a request carries in ``SamplingParams.extra_args[EXTRA_ARGS_KEY]``: plain JSON (it crosses vLLM's
    process boundary with the request)."""
    return {"stream": stream, "sections": [[s.label, s.bars] for s in plan.sections], "metre": plan.metre,
            "quotas": list(plan.quotas), "forced": [[bar, list(tokens)] for bar, tokens in plan.forced],
            "copies": [[bar, source] for bar, source in plan.copies], "budget": int(budget),
            **_guard_args(plan)}


def _guard_args(plan: Plan) -> dict:
    """The plan's harmony guard as JSON (absent when unguarded, so unguarded requests carry what they did)."""
    args = {}
    if plan.guard_chords:
        args["guard_chords"] = list(plan.guard_chords)
    if plan.guard_pitch_changes:
        args["guard_pitch_sets"] = [list(values) for values in plan.guard_pitch_sets]
        args["guard_pitch_changes"] = [list(change) for change in plan.guard_pitch_changes]
    return args


def _read_guard_args(args: dict) -> dict:
    """The ``Plan`` fields of ``_guard_args``' output."""
    return {"guard_chords": tuple(int(t) for t in args.get("guard_chords", ())),
            "guard_pitch_sets": tuple(tuple(int(v) for v in values) for values in args.get("guard_pitch_sets", ())),
            "guard_pitch_changes": tuple((int(bar), int(position), int(k))
                                         for bar, position, k in args.get("guard_pitch_changes", ()))}


def read_grammar_args(args: dict) -> tuple[str, Plan, int]:
    """(stream, plan, budget) of ``grammar_args``' output; ValueError names what is wrong (vLLM answers 400)."""
    try:
        stream = args["stream"]
        plan = Plan(tuple(Section(str(label), int(bars)) for label, bars in args["sections"]), str(args["metre"]),
                    tuple(int(q) for q in args.get("quotas", ())),
                    tuple((int(bar), tuple(int(t) for t in tokens)) for bar, tokens in args.get("forced", ())),
                    tuple((int(bar), int(source)) for bar, source in args.get("copies", ())),
                    **_read_guard_args(args))
        budget = int(args["budget"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{EXTRA_ARGS_KEY}: malformed grammar arguments ({type(err).__name__}: {err})") from None
    if stream not in STREAM_NAMES:
        raise ValueError(f"{EXTRA_ARGS_KEY}: unknown stream {stream!r}; known: {', '.join(STREAM_NAMES)}")
    # What the grammar's start() would refuse inside the engine, where an exception stops it for every request.
    if not plan.sections or any(s.label not in SECTION_LABELS or not 1 <= s.bars <= MAX_SECTION_BARS
                                for s in plan.sections):
        raise ValueError(f"{EXTRA_ARGS_KEY}: sections must be 1-{MAX_SECTION_BARS} bars of {', '.join(SECTION_LABELS)}")
    if plan.quotas and len(plan.quotas) != plan.n_bars:
        raise ValueError(f"{EXTRA_ARGS_KEY}: {len(plan.quotas)} bar quotas for a form of {plan.n_bars} bars")
    if any(not 1 <= bar <= plan.n_bars for bar, _ in plan.forced) or budget < 1:
        raise ValueError(f"{EXTRA_ARGS_KEY}: forced bars must be bars of the form and the budget positive")
    given = {bar for bar, _ in plan.forced}
    if any(not 1 <= source < bar <= plan.n_bars or bar in given for bar, source in plan.copies):
        raise ValueError(f"{EXTRA_ARGS_KEY}: a copied bar must copy an earlier bar of the form and not be given")
    n_sets = len(plan.guard_pitch_sets)
    if any(not (1 <= bar <= plan.n_bars and 0 <= k < n_sets) for bar, _, k in plan.guard_pitch_changes):
        raise ValueError(f"{EXTRA_ARGS_KEY}: guard_pitch_changes must name bars of the form and guard_pitch_sets")
    return stream, plan, budget


@dataclass
class _Row:
    """One opted-in request of the running batch: its output (vLLM's live list) and how much of it was stepped."""

    output: list[int]
    consumed: int
    fresh: tuple[str, Plan, int] | None = None   # not yet in the batched state: (stream, plan, budget)
    position: int = -1                            # its row in the batched state
    refused: bool = False                         # its plan did not start: it may only end


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks each opted-in row of vLLM's batch to what its grammar state allows (see the module docstring)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        model_dir = Path(vllm_config.model_config.model)
        vocab = Vocabulary.load(model_dir / "vocabulary.json")
        self.music = _MusicIds(model_dir, vocab)
        # The tables on the engine's device: the mask is made where the logits are.
        self.grammar = Grammar(vocab, device)
        self.rows: dict[int, _Row] = {}           # batch index -> row
        self.order: list[int] = []                # batch index of each row of ``state``
        self.state: GrammarState | None = None
        self.changed = False
        self.refusing = False                     # some row's plan did not start
        self.index: torch.Tensor | None = None    # ``order`` on the device
        self.stats = _Stats()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(EXTRA_ARGS_KEY)
        if args is not None:
            read_grammar_args(args)

    def is_argmax_invariant(self) -> bool:
        return False   # the mask changes which token is the most likely one

    # -- the batch's makeup -------------------------------------------------------------------------------------
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        tick = time.perf_counter()
        if batch_update is not None:
            self._apply_batch_update(batch_update)
        if self.changed:
            self._rebuild()
        if self.state is not None:
            self._consume_new_tokens()
        self.stats.grammar_seconds += time.perf_counter() - tick

    def _apply_batch_update(self, update: BatchUpdate) -> None:
        # vLLM's order: removed, then added (which may take a removed row's index), then moved.
        for index in update.removed:
            if self.rows.pop(index, None) is not None:
                self.changed = True
        for index, params, _prompt, output in update.added:
            args = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
            replaced = self.rows.pop(index, None)
            if args is not None:
                # A request resumed after preemption comes back with tokens already written: they are replayed.
                self.rows[index] = _Row(output, 0, read_grammar_args(args))
            self.changed = self.changed or args is not None or replaced is not None
        for first, second, direction in update.moved:
            a, b = self.rows.pop(first, None), self.rows.pop(second, None)
            if a is not None:
                self.rows[second] = a
            if b is not None and direction == MoveDirectionality.SWAP:
                self.rows[first] = b
            self.changed = self.changed or a is not None or b is not None

    def _rebuild(self) -> None:
        """The batched state of ``rows`` in batch order: kept rows carry their state over, new rows start."""
        self.changed = False
        kept = [(index, row) for index, row in sorted(self.rows.items()) if row.fresh is None]
        fresh = [(index, row) for index, row in sorted(self.rows.items()) if row.fresh is not None]
        if not self.rows:
            self.state, self.order, self.index = None, [], None
            self.stats.idle()
            return
        parts, where = [], {}
        if kept:
            parts.append(self.state.take([row.position for _, row in kept]))
            where.update({index: k for k, (index, _) in enumerate(kept)})
        if fresh:
            parts.append(self._start([row for _, row in fresh]))
            where.update({index: len(kept) + k for k, (index, _) in enumerate(fresh)})
            for _, row in fresh:
                row.fresh = None
        state = parts[0] if len(parts) == 1 else concat_states(parts)
        self.order = sorted(self.rows)
        self.state = state.take([where[index] for index in self.order])
        for k, index in enumerate(self.order):
            self.rows[index].position = k
        self.index = torch.tensor(self.order, dtype=torch.long, device=self.grammar.device)
        self.refusing = any(row.refused for row in self.rows.values())

    def _start(self, rows: list[_Row]) -> GrammarState:
        """The start states of new rows. A plan the grammar refuses (a budget too small for its form: the checks
        that need the vocabulary) must not raise here, where it would stop the engine: its row may only end
        (``<|eot_id|>``), and the caller's check of the answer fails that one request."""
        streams, plans, budgets = (list(column) for column in zip(*(row.fresh for row in rows)))
        try:
            return self.grammar.start(streams, plans, budgets)
        except (SongError, KeyError, ValueError):
            states = []
            for row, stream, plan, budget in zip(rows, streams, plans, budgets):
                try:
                    states.append(self.grammar.start([stream], [plan], [budget]))
                except (SongError, KeyError, ValueError):
                    row.refused = True
                    states.append(self.grammar.start([stream], [Plan(plan.sections[:1], plan.metre)]))
            return concat_states(states)

    def _consume_new_tokens(self) -> None:
        """Step every row with the tokens the engine appended since the last step (one per step while decoding;
        more for a resumed request), one batched grammar step per token depth."""
        rows = [self.rows[index] for index in self.order]
        while True:
            pending = [len(row.output) - row.consumed for row in rows]
            if max(pending) <= 0:
                return
            # A row with nothing new gets the end-of-turn id: not a music token, so its state stays as it is.
            tokens = [row.output[row.consumed] if n > 0 else self.music.eot_id for row, n in zip(rows, pending)]
            consume(self.grammar, self.state, torch.tensor(tokens), self.music)
            for row, n in zip(rows, pending):
                row.consumed += n > 0

    # -- the mask ----------------------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.state is None:
            return logits
        tick = time.perf_counter()
        # (vLLM's CPU worker pins its threads: the grammar's small tensors run on them as they are.)
        allowed = allowed_tokens(self.grammar, self.state, self.music, logits.shape[-1]).to(logits.device)
        if self.refusing:
            refused = torch.tensor([self.rows[index].refused for index in self.order], device=allowed.device)
            allowed[refused] = False
            allowed[refused, self.music.eot_id] = True
        if len(self.order) == logits.shape[0]:   # every row opted in (``order`` is then 0..n-1)
            logits.masked_fill_(~allowed, NEG_INF)
        else:   # some rows of the batch did not opt in
            index = self.index.to(logits.device)
            logits[index] = logits[index].masked_fill(~allowed, NEG_INF)
        self.stats.step(tick, time.perf_counter(), logits.shape[0], self.state.stream)
        return logits


class _Stats:
    """What the processor saw, for the benchmark and the tests (which cannot reach into vLLM's worker process):
    written as JSON to ``$MUSICRAY_GRAMMAR_STATS`` (when set) every 32 steps and whenever the batch empties.

    ``step_seconds`` sums the time from one masked step's ``apply`` to the next (a whole engine step: forward
    pass, sampling, scheduling) over steps that follow one another; ``grammar_seconds`` is this processor's
    part of it (``update_state`` and ``apply``)."""

    def __init__(self):
        self.path = os.environ.get(STATS_ENV)
        self.steps = self.rows_max = self.streams_max = self.mixed_steps = 0
        self.grammar_seconds = self.step_seconds = 0.0
        self.rows_by_step: dict[int, int] = {}
        self.last_apply: float | None = None

    def step(self, started: float, ended: float, rows: int, streams: torch.Tensor) -> None:
        self.grammar_seconds += ended - started
        if self.last_apply is not None:
            self.step_seconds += ended - self.last_apply
        self.last_apply = ended
        self.steps += 1
        distinct = len(set(streams.tolist()))
        self.rows_max, self.streams_max = max(self.rows_max, rows), max(self.streams_max, distinct)
        self.mixed_steps += distinct > 1
        self.rows_by_step[rows] = self.rows_by_step.get(rows, 0) + 1
        if self.path and self.steps % 32 == 0:
            self.write()

    def idle(self) -> None:
        if self.last_apply is not None:
            self.last_apply = None
            if self.path:
                self.write()

    def write(self) -> None:
        data = {"steps": self.steps, "rows_max": self.rows_max, "streams_max": self.streams_max,
                "mixed_steps": self.mixed_steps, "grammar_seconds": self.grammar_seconds,
                "step_seconds": self.step_seconds, "rows_by_step": self.rows_by_step}
        Path(self.path).write_text(json.dumps(data))


class _MusicIds:
    """What masking needs of ``musicray.model.MusicTokenizer``: the music block's offset and size, and the
    end-of-turn id, read from the files ``save_music_model`` wrote (no tokenizer load in the engine process)."""

    def __init__(self, model_dir: Path, vocab: Vocabulary):
        self.vocab = vocab
        self.offset = int(json.loads((model_dir / MUSICRAY_JSON).read_text())["music_token_offset"])
        added = json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens", [])
        ids = {token["content"]: token["id"] for token in added}
        self.eot_id = ids.get("<|eot_id|>")
        if self.eot_id is None:
            config = json.loads((model_dir / "config.json").read_text())
            eos = config.get("eos_token_id")
            self.eot_id = eos[0] if isinstance(eos, list) else eos
