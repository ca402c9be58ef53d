"""The music grammar: one automaton, written as tables, compiled once into tensors.

The tables say, per stream (see ``musicray.streams.STREAMS``), which token family may follow which
(``GRAPH``), which counter must allow a family (``GUARDS``), which families must rise within a scope
(``RISING``/``RESETS``: positions within a bar, tracks within a position, pitches within a track), which
family spends a per-bar quota (``QUOTA``: one velocity per given note in the dynamics stream), and how many
tokens of a family one position may hold (``PER_POSITION``: the melody's pitches at an onset), and which streams
open every bar on its downbeat (``DOWNBEAT_FIRST``: the chord stream restates the sounding chord). A *plan* gives
the counters' targets: the form (section tokens in order, bars each), the metre (positions per bar) and the
quotas, and it may *force* bars: a forced bar's content (the tokens after its ``<Bar>``) is given, the mask
allows exactly the next given token there and the bar closes after the last one (infilling regenerates the
other bars). It may also *copy* bars: a copied bar's content is whatever the same row wrote in an earlier bar
(a returning section repeats its first occurrence), forced token by token like a given bar once that bar is
written; a copied token that the counters no longer allow (a note that would sound past the form's end) ends
the copy there and the bar goes on freely.
A plan may also carry a *harmony guard* (``musicray.harmony_guard``): the Chord tokens a body may
use and, per (bar, position), the Pitch values; ``mask`` applies it (generation), ``step`` and ``validate`` do not
(real data leaves it), and a step it would leave without a token is unguarded.

An optional token *budget* per row (generation's ``max_new_tokens``) makes the mask close the form in time:
a family is allowed only if, after it, the tokens it commits to (shortest path in ``GRAPH`` back to a point
where the bar may close) and the fewest tokens that finish the form still fit the budget.

The compiled ``Grammar`` runs a whole batch at once, each row with its own stream, plan and state:
``start`` → ``mask`` (allowed next tokens, [batch, vocab]) → ``step`` (consume one token per row). The same
engine validates sequences (``validate``), masks logits during generation and masks the training loss.
It has two implementations of one automaton, both read from the same compiled tables: the tensor engine (a batch
as tensors: ~150 small ops per mask + step whatever the batch, cheapest per row for large batches) and the row
engine (``Grammar.row_batch``: small batches, each row stepped in plain Python and its token mask looked up by a
small key, XGrammar's precomputed per-state masks); tests/test_grammar.py holds them to the same masks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from musicray.song import Section, SongError, metre
from musicray.streams import TASK_TARGET, decode_header
from musicray.tokens import FAMILIES, Vocabulary

_BAR_CLOSE = ("Bar", "Sec", "End")

# prev family -> families allowed next. "Start" is the state before the first token.
_MELODY_GRAPH = {
    "Start": ("Sec",), "Sec": ("Bar",), "Bar": ("Pos",) + _BAR_CLOSE,
    "Pos": ("Pitch",), "Pitch": ("Dur",), "Dur": ("Pitch", "Pos") + _BAR_CLOSE,
}
GRAPH: dict[str, dict[str, tuple[str, ...]]] = {
    "song": {
        "Start": ("Sec",), "Sec": ("Bar",), "Bar": ("Tempo", "TempoChange"), "Tempo": ("Pos",) + _BAR_CLOSE,
        "TempoChange": ("Pos",) + _BAR_CLOSE,
        "Pos": ("NoChord", "Chord", "Track"), "NoChord": ("Track", "Pos") + _BAR_CLOSE,
        "Chord": ("Bass", "Track", "Pos") + _BAR_CLOSE,
        "Bass": ("Track", "Pos") + _BAR_CLOSE, "Track": ("Pitch",), "Pitch": ("Dur",), "Dur": ("Vel",),
        "Vel": ("Pitch", "Track", "Pos") + _BAR_CLOSE,
    },
    "chord": {
        "Start": ("Sec",), "Sec": ("Bar",), "Bar": ("Pos",), "Pos": ("NoChord", "Chord"),
        "NoChord": ("Pos",) + _BAR_CLOSE, "Chord": ("Bass", "Pos") + _BAR_CLOSE, "Bass": ("Pos",) + _BAR_CLOSE,
    },
    "melody": _MELODY_GRAPH,
    "secondary": _MELODY_GRAPH,
    "notes": {
        "Start": ("Sec",), "Sec": ("Bar",), "Bar": ("Pos",) + _BAR_CLOSE, "Pos": ("Track",),
        "Track": ("Pitch",), "Pitch": ("Dur",), "Dur": ("Pitch", "Track", "Pos") + _BAR_CLOSE,
    },
    "dynamics": {"Start": ("Sec",), "Sec": ("Bar",), "Bar": ("Vel",) + _BAR_CLOSE, "Vel": ("Vel",) + _BAR_CLOSE},
    "tempo": {"Start": ("Sec",), "Sec": ("Bar",), "Bar": ("Tempo", "TempoChange"), "Tempo": _BAR_CLOSE,
              "TempoChange": _BAR_CLOSE},
}
STREAM_NAMES: tuple[str, ...] = tuple(GRAPH)

# Counter conditions a family needs (families not listed need none).
GUARD_NAMES: tuple[str, ...] = ("always", "bar_left", "section_next", "form_done", "quota_left", "after_first_bar",
                                "position_room")
# A tempo change needs a bar before it in the body (the first bar's tempo is absolute).
GUARDS: dict[str, str] = {"Bar": "bar_left", "Sec": "section_next", "End": "form_done",
                          "TempoChange": "after_first_bar"}
# Per stream: the family that spends the bar's quota (it then needs "quota_left").
QUOTA: dict[str, str] = {"dynamics": "Vel"}
# Per stream: a family and how many of its tokens one position may hold (it then needs "position_room"). POP909's
# MELODY sounds at most 2 pitches at an onset (one at 99.9 % of its 292,695 onsets); without the cap a small model
# can stack notes on one position up to the top of the pitch range.
PER_POSITION: dict[str, tuple[str, int]] = {"melody": ("Pitch", 2)}
# Streams whose every bar opens on its downbeat (<Pos_0>): the chord stream restates the chord sounding there, so
# that a bar says all that sounds in it (a copied bar sounds as its source, whatever came before it).
DOWNBEAT_FIRST: tuple[str, ...] = ("chord",)
# Families whose values must strictly rise until a family that opens a new scope resets them.
RISING: tuple[str, ...] = ("Pos", "Track", "Pitch")
RESETS: dict[str, tuple[str, ...]] = {"Bar": ("Pos", "Track", "Pitch"), "Pos": ("Track", "Pitch"), "Track": ("Pitch",)}
# Families whose value counts grid steps from the last position: they may not pass the form's end (a note
# sounds at most until the last bar's end), bounded when a Pos is read.
UNTIL_FORM_END: tuple[str, ...] = ("Dur",)

_FAMILY = {name: i for i, name in enumerate(FAMILIES)}
_START = len(FAMILIES)
_END = _FAMILY["End"]
_NO_LIMIT = 1 << 30
# Batches up to this size step on Python rows (``Grammar._row_step``) rather than tensors: on CPU a row costs about
# what a tensor step costs per row at 256-512 rows (docs/benchmarks.md, "Decoding: reading the figures").
ROW_BATCH = 256
# Distinct row masks kept (a mask is one vocabulary of bools; a long song needs a few thousand keys).
ROW_MASK_CACHE = 1 << 16


def _budget_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Per stream and family: the fewest tokens after it before the bar may close (shortest path in GRAPH to a
    node followed by <Bar>), and how much of the form's remaining minimum the family itself fulfils."""
    close_cost = torch.zeros(len(STREAM_NAMES), len(FAMILIES), dtype=torch.long)
    finish_drop = torch.zeros(len(STREAM_NAMES), len(FAMILIES), dtype=torch.long)
    for s, stream in enumerate(STREAM_NAMES):
        graph = GRAPH[stream]
        cost = {node: 0 for node, nexts in graph.items() if "Bar" in nexts}
        frontier = list(cost)
        while frontier:  # breadth-first, backwards from the closable nodes
            reached = []
            for node, nexts in graph.items():
                if node not in cost and any(n in frontier for n in nexts):
                    cost[node] = 1 + min(cost[n] for n in nexts if n in cost)
                    reached.append(node)
            frontier = reached
        for node, value in cost.items():
            if node != "Start":
                close_cost[s, _FAMILY[node]] = value
        finish_drop[s, _FAMILY["Bar"]] = 1 + cost["Bar"]
        finish_drop[s, _FAMILY["Sec"]] = 1
        finish_drop[s, _FAMILY["End"]] = 1
        if stream in QUOTA:
            finish_drop[s, _FAMILY[QUOTA[stream]]] = 1
    return close_cost, finish_drop


@contextlib.contextmanager
def small_tensor_threads(device: torch.device | str):
    """One intra-op thread on CPU while stepping the grammar: its per-step tensors are tiny, and thread fan-out
    costs more than it saves (4-20x slower on a busy 2-core machine)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Plan:
    """What the counters must reach: the form in order, the metre, and (dynamics) notes per bar."""

    sections: tuple[Section, ...]
    metre: str
    quotas: tuple[int, ...] = ()
    # (bar number from 1, the bar's tokens after its <Bar>) for every bar whose content is given
    forced: tuple[tuple[int, tuple[int, ...]], ...] = ()
    # (bar, earlier bar), numbered from 1: the bar repeats what the row wrote in the earlier bar
    copies: tuple[tuple[int, int], ...] = ()
    # -- the harmony guard (generation only: ``musicray.harmony_guard`` fills these; empty: unguarded) -----------
    # the Chord token ids the body may use (no-chord is always allowed)
    guard_chords: tuple[int, ...] = ()
    # allowed Pitch token values, one set per harmony, and (bar from 1, position, set) where each set starts to hold
    guard_pitch_sets: tuple[tuple[int, ...], ...] = ()
    guard_pitch_changes: tuple[tuple[int, int, int], ...] = ()

    @property
    def n_bars(self) -> int:
        return sum(s.bars for s in self.sections)

    @classmethod
    def from_prompt(cls, prompt: list[int], vocab: Vocabulary) -> "Plan":
        """The plan an example's header implies; quotas count the notes of the ``<Input_notes>`` body."""
        header = decode_header(prompt, vocab)
        quotas: list[int] = []
        for token in header.inputs.get("notes", []):
            if vocab.family[token] == "Bar":
                quotas.append(0)
            elif vocab.family[token] == "Pitch" and quotas:
                quotas[-1] += 1
        return cls(tuple(header.sections), header.metre, tuple(quotas))


@dataclass(frozen=True)
class GrammarError:
    index: int
    token: str
    reason: str

    def __str__(self) -> str:
        return f"token {self.index} {self.token}: {self.reason}"


@dataclass
class GrammarState:
    """Per-row state of a batch (all tensors have the batch as first dimension)."""

    stream: torch.Tensor      # stream index
    node: torch.Tensor        # family of the last token (or START)
    section: torch.Tensor     # sections opened so far
    n_sections: torch.Tensor
    bars_left: torch.Tensor   # in the open section
    bar: torch.Tensor         # bars opened so far
    quota_left: torch.Tensor  # tokens of the quota family still owed in this bar
    at_position: torch.Tensor  # tokens of the stream's PER_POSITION family since the last <Pos>
    positions: torch.Tensor   # positions per bar (the metre's)
    low: torch.Tensor         # [batch, families]: a token's value must be > low[family]
    high: torch.Tensor        # [batch, families]: ... and < high[family]
    section_values: torch.Tensor  # [batch, max sections]: Sec rank of each section of the form
    section_bars: torch.Tensor    # [batch, max sections]
    quotas: torch.Tensor          # [batch, max bars + 1]: quota of bar k at k (1-based), 0 elsewhere
    bars_after: torch.Tensor      # [batch, max sections]: bars of sections k.. of the form
    quota_after: torch.Tensor     # [batch, max bars + 1]: quota of the bars after bar k
    budget: torch.Tensor          # tokens each row may still emit (a large number when unbounded)
    forced_tokens: torch.Tensor   # [batch, all forced tokens]: the forced bars' contents, one after another
    forced_start: torch.Tensor    # [batch, max bars + 1]: where bar k's content starts in forced_tokens
    forced_length: torch.Tensor   # [batch, max bars + 1]: its length; -1 for a bar that is not forced
    forced_extra_after: torch.Tensor  # [batch, max bars + 1]: tokens forced bars after bar k add to their minimum
    forced_next: torch.Tensor     # [batch]: index of the next forced token in forced_tokens
    forced_end: torch.Tensor      # [batch]: end of the open bar's forced content (== forced_next: none left)
    in_forced_bar: torch.Tensor   # [batch] bool: the open bar is forced (after its content, it must close)
    # Copied bars: the rows' own bar contents are written into forced_tokens after the given bars' contents (from
    # history_base on), so that a copied bar is forced from there like a given one.
    copy_source: torch.Tensor     # [batch, max bars + 1]: the bar that bar k copies (0: none)
    history_base: torch.Tensor    # [batch]: where the row's written bar contents start in forced_tokens (-1: none)
    written: torch.Tensor         # [batch]: bar-content tokens written so far
    bar_offset: torch.Tensor      # [batch, max bars + 1]: where bar k's written content starts (from history_base)
    bar_length: torch.Tensor      # [batch, max bars + 1]: its length so far
    in_copied_bar: torch.Tensor   # [batch] bool: the open bar copies an earlier one (and has not left the copy)
    copies_of_open_bar: torch.Tensor  # [batch]: how many later bars copy the open bar
    # The harmony guard's tables (``_guard_tables``; all-allowing for an unguarded row)
    guard_chords: torch.Tensor    # [batch, Chord tokens] bool: the Chord tokens the row may use
    guard_pitch_sets: torch.Tensor  # [batch, sets * Pitch tokens] bool: set k's Pitch values from k * Pitch tokens
    guard_pitch_at: torch.Tensor  # [batch, bars * vocab.max_positions]: the set holding at (bar, position); -1 none
    # family_mask of the current state, kept from mask() for the step() that follows it (decoding asks both)
    family_cache: torch.Tensor | None = None
    has_forced: bool = False      # some row's plan forces bars (else the forced-bar bookkeeping is skipped)
    has_copies: bool = False      # some row's plan copies bars (else the history is not written)
    has_guard: bool = False       # some row's plan has a harmony guard (else the mask skips it)
    # Small batches step on a mirror of the rows in plain Python (``_RowState``, see ``Grammar.row_batch``): while it
    # is set, the tensors of _MIRRORED fields are stale and ``sync()`` writes them back.
    rows: list | None = None
    rows_done: torch.Tensor | None = None   # ``done`` of the rows, kept until they step

    @property
    def done(self) -> torch.Tensor:
        if self.rows is not None:
            if self.rows_done is None:
                self.rows_done = torch.tensor([row.node == _END for row in self.rows], device=self.node.device)
            return self.rows_done
        return self.node == _END

    def sync(self) -> "GrammarState":
        """Write the Python rows' fields back into the tensors (the tensor engine reads them) and drop the rows."""
        if self.rows is not None:
            rows, self.rows = self.rows, None
            for name in _MIRRORED:
                values = [getattr(row, name) for row in rows]
                old = getattr(self, name)
                if old.dim() == 2:
                    width = max(len(v) for v in values)
                    values = [v + [0] * (width - len(v)) for v in values]   # forced_tokens grows with history
                setattr(self, name, torch.tensor(values, dtype=old.dtype, device=old.device))
            self.family_cache = self.rows_done = None
        return self

    def row(self, i: int) -> dict:
        self.sync()
        return {name: int(getattr(self, name)[i]) for name in
                ("stream", "node", "section", "n_sections", "bars_left", "bar", "quota_left", "at_position")}

    def take(self, rows: torch.Tensor | list[int]) -> "GrammarState":
        """The state of ``rows`` (in that order) as a batch of its own; the rows' tables keep their width."""
        self.sync()
        index = torch.as_tensor(rows, dtype=torch.long, device=self.node.device)
        taken = {name: getattr(self, name).index_select(0, index) for name in _ROW_FIELDS}
        return GrammarState(**taken, has_forced=self.has_forced, has_copies=self.has_copies,
                            has_guard=self.has_guard)


# Every per-row tensor of a GrammarState, and for the per-plan tables (whose width depends on the batch's longest
# form) the value start() leaves beyond a plan's end: concatenating states pads with it.
_ROW_FIELDS: tuple[str, ...] = tuple(name for name in GrammarState.__dataclass_fields__
                                     if name not in ("family_cache", "has_forced", "has_copies", "has_guard", "rows",
                                                     "rows_done"))
# The fields a _RowState mirrors as Python ints (per row) or lists (per-row tables); the harmony guard's tables are
# read from the tensors (they never change).
_MIRRORED: tuple[str, ...] = tuple(name for name in _ROW_FIELDS if not name.startswith("guard_"))
_TABLE_PADDING: dict[str, int] = {"section_values": -10, "section_bars": 0, "quotas": 0, "bars_after": 0,
                                  "quota_after": 0, "forced_tokens": 0, "forced_start": 0, "forced_length": -1,
                                  "forced_extra_after": 0, "copy_source": 0, "bar_offset": 0, "bar_length": 0,
                                  "guard_pitch_sets": 0, "guard_pitch_at": -1}


def concat_states(states: list[GrammarState]) -> GrammarState:
    """One batch of the rows of ``states`` in order (each row steps as it did in its own batch): rows come and go
    in a serving engine's running batch while each keeps its grammar state."""
    fields = {}
    for state in states:
        state.sync()
    for name in _ROW_FIELDS:
        parts = [getattr(state, name) for state in states]
        if name in _TABLE_PADDING:
            width = max(part.shape[1] for part in parts)
            parts = [torch.nn.functional.pad(part, (0, width - part.shape[1]), value=_TABLE_PADDING[name])
                     for part in parts]
        fields[name] = torch.cat(parts)
    return GrammarState(**fields, has_forced=any(state.has_forced for state in states),
                        has_copies=any(state.has_copies for state in states),
                        has_guard=any(state.has_guard for state in states))


class Grammar:
    """The tables compiled against one vocabulary, on one device."""

    def __init__(self, vocab: Vocabulary, device: str | torch.device = "cpu", row_batch: int = ROW_BATCH):
        """``row_batch``: the largest batch that steps on Python rows instead of tensors (0: always tensors)."""
        self.vocab = vocab
        self.device = torch.device(device)
        self.row_batch = row_batch
        n_fam = len(FAMILIES)
        allowed = torch.zeros(len(STREAM_NAMES), n_fam + 1, n_fam, dtype=torch.bool)
        guard = torch.zeros(len(STREAM_NAMES), n_fam, dtype=torch.long)
        for s, stream in enumerate(STREAM_NAMES):
            for prev, nexts in GRAPH[stream].items():
                for fam in nexts:
                    allowed[s, _START if prev == "Start" else _FAMILY[prev], _FAMILY[fam]] = True
            # A finished row may only repeat <End>, so batched generation can pad with it.
            allowed[s, _FAMILY["End"], _FAMILY["End"]] = True
            for fam, name in GUARDS.items():
                guard[s, _FAMILY[fam]] = GUARD_NAMES.index(name)
            if stream in QUOTA:
                guard[s, _FAMILY[QUOTA[stream]]] = GUARD_NAMES.index("quota_left")
            if stream in PER_POSITION:
                guard[s, _FAMILY[PER_POSITION[stream][0]]] = GUARD_NAMES.index("position_room")
        self.quota_family = torch.tensor([_FAMILY[QUOTA[s]] if s in QUOTA else -1 for s in STREAM_NAMES])
        self.downbeat_first = torch.tensor([s in DOWNBEAT_FIRST for s in STREAM_NAMES])
        self.position_family = torch.tensor([_FAMILY[PER_POSITION[s][0]] if s in PER_POSITION else -1
                                             for s in STREAM_NAMES])
        self.position_limit = torch.tensor([PER_POSITION[s][1] if s in PER_POSITION else _NO_LIMIT
                                            for s in STREAM_NAMES])
        close_cost, finish_drop = _budget_tables()
        resets = torch.zeros(n_fam, n_fam, dtype=torch.bool)
        for fam, reset in RESETS.items():
            for other in reset:
                resets[_FAMILY[fam], _FAMILY[other]] = True
        rising = torch.zeros(n_fam, dtype=torch.bool)
        rising[[_FAMILY[f] for f in RISING]] = True
        bar_close = torch.zeros(n_fam, dtype=torch.bool)
        bar_close[[_FAMILY[f] for f in _BAR_CLOSE]] = True
        until_form_end = torch.zeros(n_fam, dtype=torch.bool)
        until_form_end[[_FAMILY[f] for f in UNTIL_FORM_END]] = True
        self.first_sec = vocab.ids_of["Sec"][0]
        value = torch.tensor(vocab.value, dtype=torch.long).clamp(min=0)  # unvalued tokens pass every bound
        value[vocab.ids_of["Sec"]] = torch.arange(len(vocab.ids_of["Sec"]))  # Sec guards compare ranks
        family = torch.tensor([_FAMILY[f] for f in vocab.family], dtype=torch.long)
        to = dict(device=self.device)
        self.allowed, self.guard, self.resets, self.rising = allowed.to(**to), guard.to(**to), resets.to(**to), \
            rising.to(**to)
        self.until_form_end = until_form_end.to(**to)
        self.bar_close = bar_close.to(**to)
        self.quota_family, self.downbeat_first = self.quota_family.to(**to), self.downbeat_first.to(**to)
        self.position_family, self.position_limit = self.position_family.to(**to), self.position_limit.to(**to)
        self.close_cost, self.finish_drop = close_cost.to(**to), finish_drop.to(**to)
        self.bar_cost = (1 + close_cost[:, _FAMILY["Bar"]]).to(**to)
        self.token_family, self.token_value = family.to(**to), value.to(**to)
        # [streams, families]: the tokens a bar's copies must find room for (the quota family's are counted by
        # the quotas already, and the bar-closing ones are not part of a bar's content)
        fam_index = torch.arange(n_fam)
        self.copy_counted = (~bar_close[None, :] & (fam_index[None, :] != self.quota_family.cpu()[:, None])).to(**to)
        self.chord_ids, self.pitch_ids = self._block("Chord"), self._block("Pitch")
        self._compile_rows()

    def _block(self, family: str) -> slice:
        """The ids of a family as a slice (the vocabulary lays each family out in one run, by value)."""
        ids = self.vocab.ids_of[family]
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise AssertionError(f"{family} tokens are not contiguous in the vocabulary")
        return slice(ids[0], ids[0] + len(ids))

    # -- batch engine ------------------------------------------------------------------------------------------
    def start(self, streams: list[str], plans: list[Plan], budgets: list[int] | None = None) -> GrammarState:
        """Initial state of a batch; ``budgets`` (optional) caps the tokens of each row, <End> included."""
        if len(streams) != len(plans):
            raise ValueError("one plan per stream")
        batch = len(plans)
        max_sections = max(len(p.sections) for p in plans) + 1
        max_bars = max(p.n_bars for p in plans) + 2
        section_values = torch.full((batch, max_sections), -10, dtype=torch.long)
        section_bars = torch.zeros((batch, max_sections), dtype=torch.long)
        quotas = torch.zeros((batch, max_bars), dtype=torch.long)
        high = torch.full((batch, len(FAMILIES)), _NO_LIMIT, dtype=torch.long)
        positions = torch.zeros(batch, dtype=torch.long)
        for i, (stream, plan) in enumerate(zip(streams, plans)):
            if stream not in GRAPH:
                raise SongError(f"stream: unknown stream {stream!r}; known: {', '.join(STREAM_NAMES)}")
            for k, section in enumerate(plan.sections):
                section_values[i, k] = self.vocab.token("Sec", f"{section.label}{section.bars}") - self.first_sec
                section_bars[i, k] = section.bars
            if plan.quotas:
                if len(plan.quotas) != plan.n_bars:
                    raise SongError(f"plan: {len(plan.quotas)} bar quotas for a form of {plan.n_bars} bars")
                quotas[i, 1:plan.n_bars + 1] = torch.tensor(plan.quotas)
            high[i, _FAMILY["Pos"]] = positions[i] = metre(plan.metre).positions_per_bar
        forced_tokens, forced_start, forced_length, forced_extra = self._forced_tables(streams, plans, max_bars)
        copy_source = self._copy_table(plans, max_bars)
        has_copies = any(p.copies for p in plans)
        # Room for the copying rows' own bar contents after the given ones (grown in step() when full); -1 marks a
        # row that copies nothing, so that it keeps no history when it shares a batch with one that does.
        history_base = torch.tensor([forced_tokens.shape[1] if p.copies else -1 for p in plans], dtype=torch.long)
        if has_copies:
            forced_tokens = torch.cat([forced_tokens, torch.zeros((batch, 256), dtype=torch.long)], dim=1)
        to = dict(device=self.device)
        bars_after = section_bars.flip(1).cumsum(1).flip(1)
        quota_after = quotas.flip(1).cumsum(1).flip(1).roll(-1, 1)
        quota_after[:, -1] = 0
        budget = torch.tensor(budgets if budgets is not None else [_NO_LIMIT] * batch, dtype=torch.long)
        zeros = torch.zeros(batch, dtype=torch.long, **to)
        low = torch.full((batch, len(FAMILIES)), -1, dtype=torch.long, **to)
        state = GrammarState(
            stream=torch.tensor([STREAM_NAMES.index(s) for s in streams], **to),
            node=torch.full((batch,), _START, dtype=torch.long, **to),
            section=zeros.clone(), n_sections=torch.tensor([len(p.sections) for p in plans], **to),
            bars_left=zeros.clone(), bar=zeros.clone(), quota_left=zeros.clone(), at_position=zeros.clone(),
            positions=positions.to(**to),
            low=low, high=high.to(**to), section_values=section_values.to(**to),
            section_bars=section_bars.to(**to), quotas=quotas.to(**to), bars_after=bars_after.to(**to),
            quota_after=quota_after.to(**to), budget=budget.to(**to),
            forced_tokens=forced_tokens.to(**to), forced_start=forced_start.to(**to),
            forced_length=forced_length.to(**to),
            forced_extra_after=forced_extra.flip(1).cumsum(1).flip(1).roll(-1, 1).to(**to),
            forced_next=zeros.clone(), forced_end=zeros.clone(),
            in_forced_bar=torch.zeros(batch, dtype=torch.bool, **to),
            copy_source=copy_source.to(**to), history_base=history_base.to(**to), written=zeros.clone(),
            bar_offset=torch.zeros((batch, max_bars), dtype=torch.long, **to),
            bar_length=torch.zeros((batch, max_bars), dtype=torch.long, **to),
            in_copied_bar=torch.zeros(batch, dtype=torch.bool, **to), copies_of_open_bar=zeros.clone(),
            **{name: table.to(**to) for name, table in self._guard_tables(plans, max_bars).items()},
            has_forced=any(p.forced for p in plans) or has_copies, has_copies=has_copies,
            has_guard=any(p.guard_chords or p.guard_pitch_changes for p in plans))
        state.forced_extra_after[:, -1] = 0
        self._expect_section(state, torch.ones(batch, dtype=torch.bool, device=self.device))
        if budgets is not None:
            short = torch.nonzero(state.budget < self.tokens_to_finish(state)).flatten().tolist()
            if short:
                i = short[0]
                raise SongError(f"budget: {budgets[i]} tokens cannot hold the form of row {i} "
                                f"({plans[i].n_bars} bars need at least {int(self.tokens_to_finish(state)[i])})")
        return state

    def _forced_tables(self, streams: list[str], plans: list[Plan], max_bars: int):
        """(tokens, start, length, extra) tensors of the plans' forced bars (see ``GrammarState``)."""
        batch = len(plans)
        width = max([sum(len(tokens) for _, tokens in plan.forced) for plan in plans] + [1])
        tokens = torch.zeros((batch, width), dtype=torch.long)
        start = torch.zeros((batch, max_bars), dtype=torch.long)
        length = torch.full((batch, max_bars), -1, dtype=torch.long)
        extra = torch.zeros((batch, max_bars), dtype=torch.long)
        for i, (stream, plan) in enumerate(zip(streams, plans)):
            offset = 0
            minimum = int(self.bar_cost[STREAM_NAMES.index(stream)]) - 1   # tokens a bar needs after its <Bar>
            for bar, content in plan.forced:
                if not 1 <= bar <= plan.n_bars:
                    raise SongError(f"plan: forced bar {bar} is outside the form's {plan.n_bars} bars")
                tokens[i, offset:offset + len(content)] = torch.tensor(content, dtype=torch.long)
                start[i, bar], length[i, bar] = offset, len(content)
                extra[i, bar] = max(0, len(content) - minimum)
                offset += len(content)
        return tokens, start, length, extra

    @staticmethod
    def _copy_table(plans: list[Plan], max_bars: int) -> torch.Tensor:
        """[batch, max bars]: the bar each bar copies (0: none), checked against the form and the given bars. A
        copy of a copy copies the first bar of the chain, so that the room its tokens take is set aside while
        that bar is written."""
        table = torch.zeros((len(plans), max_bars), dtype=torch.long)
        for i, plan in enumerate(plans):
            given = {bar for bar, _ in plan.forced}
            for bar, source in sorted(plan.copies):
                if not 1 <= source < bar <= plan.n_bars:
                    raise SongError(f"plan: bar {bar} cannot copy bar {source} (an earlier bar of the form's "
                                    f"{plan.n_bars} bars)")
                if bar in given:
                    raise SongError(f"plan: bar {bar} is both given and copied")
                # A copy repeats its source's tokens, quota family included: a bar owing another number of them
                # could never close.
                if plan.quotas and plan.quotas[bar - 1] != plan.quotas[source - 1]:
                    raise SongError(f"plan: bar {bar} owes {plan.quotas[bar - 1]} quota tokens and cannot copy bar "
                                    f"{source}, which owes {plan.quotas[source - 1]}")
                table[i, bar] = table[i, source] if table[i, source] > 0 else source
        return table

    @staticmethod
    def _next_forced(state: GrammarState) -> tuple[torch.Tensor, torch.Tensor]:
        """([batch] bool: the next token is given, [batch]: that token, meaningful where it is)."""
        forcing = state.forced_next < state.forced_end
        index = state.forced_next.clamp(max=state.forced_tokens.shape[1] - 1)[:, None]
        return forcing, state.forced_tokens.gather(1, index)[:, 0]

    @staticmethod
    def _later_bars(state: GrammarState) -> torch.Tensor:
        """[batch]: bars of the form's sections after the open one."""
        sections = state.section.clamp(max=state.bars_after.shape[1] - 1)
        return torch.where(state.section < state.n_sections, state.bars_after.gather(1, sections[:, None])[:, 0],
                           torch.zeros_like(state.section))

    def tokens_to_finish(self, state: GrammarState) -> torch.Tensor:
        """[batch]: the fewest tokens that complete the form from a point where the bar may close."""
        state.sync()
        later_bars = self._later_bars(state)
        bars = state.quota_after.gather(1, state.bar.clamp(max=state.quota_after.shape[1] - 1)[:, None])[:, 0]
        forced = state.forced_extra_after.gather(1, state.bar.clamp(max=state.forced_extra_after.shape[1] - 1)[:, None])
        need = ((state.bars_left + later_bars) * self.bar_cost[state.stream] + (state.n_sections - state.section) + 1
                + state.quota_left + bars + forced[:, 0] + (state.forced_end - state.forced_next))
        return torch.where(state.done, torch.zeros_like(need), need)

    def _expect_section(self, state: GrammarState, rows: torch.Tensor) -> None:
        """Only the form's next section token is allowed as the next Sec."""
        nxt = state.section_values.gather(1, state.section.clamp(max=state.section_values.shape[1] - 1)[:, None])[:, 0]
        sec = _FAMILY["Sec"]
        state.low[:, sec] = torch.where(rows, nxt - 1, state.low[:, sec])
        state.high[:, sec] = torch.where(rows, nxt + 1, state.high[:, sec])

    def _guards(self, state: GrammarState) -> torch.Tensor:
        closed = (state.bars_left == 0) & (state.quota_left == 0)
        return torch.stack([
            torch.ones_like(closed),
            (state.bars_left > 0) & (state.quota_left == 0),
            closed & (state.section < state.n_sections),
            closed & (state.section == state.n_sections),
            state.quota_left > 0,
            state.bar > 1,
            state.at_position < self.position_limit[state.stream],
        ], dim=1)

    def family_mask(self, state: GrammarState) -> torch.Tensor:
        """[batch, families]: which families may come next."""
        state.sync()
        if state.family_cache is None:
            allowed = self.allowed[state.stream, state.node] & self._guards(state).gather(1, self.guard[state.stream])
            if not state.has_forced:
                state.family_cache = allowed & self._within_budget(state)
                return state.family_cache
            if state.has_copies:
                self._leave_impossible_copies(state, allowed)
            forcing, given = self._next_forced(state)
            # A forced token's room was set aside in the budget (tokens_to_finish counts forced bars in full).
            allowed = allowed & (self._within_budget(state) | forcing[:, None])
            # After a forced bar's content only what closes the bar may come.
            closing = state.in_forced_bar & ~forcing
            allowed = torch.where(closing[:, None], allowed & self.bar_close, allowed)
            if bool(forcing.any()):
                only = torch.nn.functional.one_hot(self.token_family[given], len(FAMILIES)).bool()
                allowed = torch.where(forcing[:, None], allowed & only, allowed)
            state.family_cache = allowed
        return state.family_cache

    def _leave_impossible_copies(self, state: GrammarState, allowed: torch.Tensor) -> None:
        """End the copy of a copied bar whose next token the counters no longer allow (``allowed``: the families
        the graph and guards allow): a note of the earlier bar would sound past the form's end, say. The bar then
        goes on freely, in generation and validation alike."""
        forcing, given = self._next_forced(state)
        stuck = forcing & state.in_copied_bar
        if not bool(stuck.any()):
            return
        rows = torch.arange(given.shape[0], device=self.device)
        family, value = self.token_family[given], self.token_value[given]
        possible = allowed[rows, family] & (value > state.low[rows, family]) & (value < state.high[rows, family])
        stuck = stuck & ~possible
        state.forced_end = torch.where(stuck, state.forced_next, state.forced_end)
        state.in_forced_bar = state.in_forced_bar & ~stuck
        state.in_copied_bar = state.in_copied_bar & ~stuck

    def _within_budget(self, state: GrammarState) -> torch.Tensor:
        """[batch, families]: emitting the family still leaves room to finish the form."""
        after = state.budget[:, None] - 1 - self.close_cost[state.stream]
        if state.has_copies:   # a token of a bar that later bars copy commits its copies to it as well
            copies = state.copies_of_open_bar
            length = state.bar_length.gather(1, state.bar.clamp(max=state.bar_length.shape[1] - 1)[:, None])
            minimum = (self.bar_cost[state.stream] - 1)[:, None]
            extra = (length + 1 + self.close_cost[state.stream] - minimum).clamp(min=0) \
                - (length - minimum).clamp(min=0)
            after = after - extra * copies[:, None] * self.copy_counted[state.stream]
        # a finished row pads with <End> whatever its budget
        return (after >= self.tokens_to_finish(state)[:, None] - self.finish_drop[state.stream]) | state.done[:, None]

    def mask(self, state: GrammarState) -> torch.Tensor:
        """[batch, vocab] bool: the tokens each row may emit next."""
        if self._on_rows(state):
            return self._mask_rows(state)
        # Each token takes its family's verdict and its family's value bounds: three gathers over the vocabulary.
        family = self.token_family.expand(state.node.shape[0], -1)
        allowed = self.family_mask(state).gather(1, family) & (self.token_value > state.low.gather(1, family)) \
            & (self.token_value < state.high.gather(1, family))
        if state.has_guard:
            allowed = self._harmony_guarded(state, allowed)
        if not state.has_forced:
            return allowed
        forcing, given = self._next_forced(state)
        if bool(forcing.any()):
            only = torch.zeros_like(allowed).scatter_(1, given[:, None], True)
            allowed = torch.where(forcing[:, None], allowed & only, allowed)
        return allowed

    def accepts(self, state: GrammarState, tokens: torch.Tensor) -> torch.Tensor:
        """[batch] bool: whether each row may emit its token now."""
        if self._on_rows(state):
            rows = self._rows(state)
            return torch.tensor([self._row_accepts(row, token) for row, token in zip(rows, tokens.tolist())],
                                dtype=torch.bool, device=self.device)
        state.sync()
        family, value = self.token_family[tokens], self.token_value[tokens]
        rows = torch.arange(tokens.shape[0], device=self.device)
        ok = self.family_mask(state)[rows, family] & (value > state.low[rows, family]) \
            & (value < state.high[rows, family])
        if not state.has_forced:
            return ok
        forcing, given = self._next_forced(state)
        return ok & (~forcing | (tokens == given))

    def step(self, state: GrammarState, tokens: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """Consume one token per row; rows whose token is not accepted (or not ``active``) keep their state.

        Returns which rows accepted their token.
        """
        if self._on_rows(state):
            rows = self._rows(state)
            active = [True] * len(rows) if active is None else active.tolist()
            ok = [self._row_step(row, token, on) for row, token, on in zip(rows, tokens.tolist(), active)]
            state.rows_done = None
            return torch.tensor(ok, dtype=torch.bool, device=self.device)
        state.sync()
        tokens = tokens.to(self.device)
        ok = self.accepts(state, tokens)
        if active is not None:
            ok = ok & active
        family, value = self.token_family[tokens], self.token_value[tokens]
        rows = torch.arange(tokens.shape[0], device=self.device)
        state.node = torch.where(ok, family, state.node)
        state.budget = state.budget - ok.long()

        opened = ok & (family == _FAMILY["Sec"])
        bars = state.section_bars.gather(1, state.section.clamp(max=state.section_bars.shape[1] - 1)[:, None])[:, 0]
        state.bars_left = torch.where(opened, bars, state.bars_left)
        state.section = state.section + opened.long()
        self._expect_section(state, opened)

        if state.has_copies:
            self._write_history(state, tokens, ok, family)
        if state.has_forced:
            state.forced_next = state.forced_next + (ok & (state.forced_next < state.forced_end)).long()
        new_bar = ok & (family == _FAMILY["Bar"])
        state.bars_left = state.bars_left - new_bar.long()
        state.bar = state.bar + new_bar.long()
        if state.has_forced and bool(new_bar.any()):
            index = state.bar.clamp(max=state.forced_start.shape[1] - 1)[:, None]
            length = state.forced_length.gather(1, index)[:, 0]
            start = state.forced_start.gather(1, index)[:, 0]
            state.in_forced_bar = torch.where(new_bar, length >= 0, state.in_forced_bar)
            state.forced_next = torch.where(new_bar, start, state.forced_next)
            state.forced_end = torch.where(new_bar, start + length.clamp(min=0), state.forced_end)
            if state.has_copies:
                self._open_copied_bars(state, new_bar, index)
        if state.has_forced:
            leaves_bar = ok & ((family == _FAMILY["Sec"]) | (family == _FAMILY["End"]))
            state.in_forced_bar = state.in_forced_bar & ~leaves_bar
            state.in_copied_bar = state.in_copied_bar & ~leaves_bar
        quota = state.quotas.gather(1, state.bar.clamp(max=state.quotas.shape[1] - 1)[:, None])[:, 0]
        state.quota_left = torch.where(new_bar, quota, state.quota_left)
        spent = ok & (family == self.quota_family[state.stream])
        state.quota_left = state.quota_left - spent.long()

        read_pos = ok & (family == _FAMILY["Pos"])
        # A bar of a DOWNBEAT_FIRST stream opens on position 0; its later positions may be any of the bar's.
        pos = _FAMILY["Pos"]
        state.high[:, pos] = torch.where(new_bar & self.downbeat_first[state.stream], 1,
                                         torch.where(read_pos, state.positions, state.high[:, pos]))
        counted = ok & (family == self.position_family[state.stream])
        state.at_position = torch.where(read_pos, torch.zeros_like(state.at_position),
                                        state.at_position + counted.long())
        if bool(read_pos.any()):
            steps_per_bar = state.positions
            steps_left = (state.bars_left + self._later_bars(state)) * steps_per_bar + steps_per_bar - value
            bounded = read_pos[:, None] & self.until_form_end
            state.high = torch.where(bounded, (steps_left + 1)[:, None], state.high)

        raise_low = ok & self.rising[family]
        state.low[rows, family] = torch.where(raise_low, value, state.low[rows, family])
        reset = ok[:, None] & self.resets[family]
        state.low = torch.where(reset, torch.full_like(state.low, -1), state.low)
        state.family_cache = None
        return ok

    def _write_history(self, state: GrammarState, tokens: torch.Tensor, ok: torch.Tensor,
                       family: torch.Tensor) -> None:
        """Keep each row's bar contents (for the bars that copy them) and set aside the room their copies take."""
        content = ok & ~self.bar_close[family] & (state.bar > 0) & (state.history_base >= 0)
        if not bool(content.any()):
            return
        rows = torch.arange(tokens.shape[0], device=self.device)
        where = state.history_base + state.written
        width = state.forced_tokens.shape[1]
        if int(where.max()) >= width:
            state.forced_tokens = torch.nn.functional.pad(state.forced_tokens, (0, width))
        index = content.nonzero().flatten()
        state.forced_tokens[index, where[index]] = tokens[index]
        state.written = state.written + content.long()
        bar = state.bar.clamp(max=state.bar_length.shape[1] - 1)
        state.bar_length[rows, bar] += content.long()
        # Beyond a bar's minimum content, each token of a copied bar is a token its copies must find room for.
        beyond = content & (state.bar_length[rows, bar] > self.bar_cost[state.stream] - 1) \
            & self.copy_counted[state.stream, family]
        targets = (state.copy_source == state.bar[:, None]).long()
        later = targets.flip(1).cumsum(1).flip(1).roll(-1, 1)
        later[:, -1] = 0
        state.forced_extra_after = state.forced_extra_after + later * beyond[:, None].long()

    @staticmethod
    def _open_copied_bars(state: GrammarState, new_bar: torch.Tensor, index: torch.Tensor) -> None:
        """At a new bar: note where its content starts, and force a copied bar's content from its source."""
        state.bar_offset.scatter_(1, index, torch.where(new_bar[:, None], state.written[:, None],
                                                        state.bar_offset.gather(1, index)))
        source = state.copy_source.gather(1, index)
        copied = new_bar & (source[:, 0] > 0)
        start = state.history_base + state.bar_offset.gather(1, source)[:, 0]
        length = state.bar_length.gather(1, source)[:, 0]
        state.forced_next = torch.where(copied, start, state.forced_next)
        state.forced_end = torch.where(copied, start + length, state.forced_end)
        state.in_forced_bar = torch.where(copied, True, state.in_forced_bar)
        state.in_copied_bar = torch.where(new_bar, copied, state.in_copied_bar)
        state.copies_of_open_bar = torch.where(new_bar, (state.copy_source == state.bar[:, None]).sum(1),
                                               state.copies_of_open_bar)

    # -- the harmony guard (generation only: see musicray.harmony_guard) --------------------------------------------
    def _guard_tables(self, plans: list[Plan], max_bars: int) -> dict[str, torch.Tensor]:
        """The plans' guard tables (``GrammarState.guard_*``); the pitch sets hold per (bar, position) from their
        change on, so a Pitch token's set is one lookup at its onset."""
        batch, positions = len(plans), self.vocab.max_positions
        n_chords, n_pitches = self.chord_ids.stop - self.chord_ids.start, self.pitch_ids.stop - self.pitch_ids.start
        chords = torch.ones((batch, n_chords), dtype=torch.bool)
        n_sets = max([len(p.guard_pitch_sets) for p in plans] + [1])
        pitch_sets = torch.zeros((batch, n_sets * n_pitches), dtype=torch.bool)
        # one bar of "no set" when no plan guards pitches: validation's batches of long forms need no table
        bars = max_bars if any(p.guard_pitch_changes for p in plans) else 1
        pitch_at = torch.full((batch, bars * positions), -1, dtype=torch.long)
        for i, plan in enumerate(plans):
            if plan.guard_chords:
                ids = torch.tensor(plan.guard_chords, dtype=torch.long) - self.chord_ids.start
                if bool(((ids < 0) | (ids >= n_chords)).any()):
                    raise SongError("plan: guard_chords holds ids that are not Chord tokens")
                chords[i] = False
                chords[i, ids] = True
            for k, values in enumerate(plan.guard_pitch_sets):
                values = torch.tensor(values, dtype=torch.long)
                if bool(((values < 0) | (values >= n_pitches)).any()):
                    raise SongError(f"plan: guard_pitch_sets[{k}] holds values outside 0..{n_pitches - 1}")
                pitch_sets[i, k * n_pitches + values] = True
            per_bar = metre(plan.metre).positions_per_bar
            for bar, position, k in sorted(plan.guard_pitch_changes):
                if not (1 <= bar <= plan.n_bars and 0 <= position < per_bar and 0 <= k < len(plan.guard_pitch_sets)):
                    raise SongError(f"plan: guard pitch change ({bar}, {position}, {k}) is not a bar and position of "
                                    f"the form with one of its {len(plan.guard_pitch_sets)} sets")
                pitch_at[i, bar * positions + position:(plan.n_bars + 1) * positions] = k
        return {"guard_chords": chords, "guard_pitch_sets": pitch_sets, "guard_pitch_at": pitch_at}

    def _harmony_guarded(self, state: GrammarState, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` narrowed by each row's guard: its Chord tokens, and its Pitch values at the open onset. A row
        the guard would leave without a token, or whose next token is given (a forced bar), keeps ``allowed``."""
        guarded = allowed.clone()
        guarded[:, self.chord_ids] &= state.guard_chords
        positions = self.vocab.max_positions
        onset = state.bar.clamp(max=state.guard_pitch_at.shape[1] // positions - 1) * positions \
            + state.low[:, _FAMILY["Pos"]].clamp(min=0)
        pitch_set = state.guard_pitch_at.gather(1, onset[:, None])
        n_pitches = self.pitch_ids.stop - self.pitch_ids.start
        columns = pitch_set.clamp(min=0) * n_pitches + torch.arange(n_pitches, device=self.device)
        guarded[:, self.pitch_ids] &= state.guard_pitch_sets.gather(1, columns) | (pitch_set < 0)
        keep = guarded.any(1)
        if state.has_forced:
            keep &= ~self._next_forced(state)[0]
        return torch.where(keep[:, None], guarded, allowed)

    # -- the row engine: the same automaton on one row's Python ints (small batches) -------------------------------
    # A tensor step is ~150 small torch ops whatever the batch, ~2 us each on CPU: at batch 1 that is the whole cost.
    # The row engine reads the same compiled tables as Python lists, steps each row with scalar arithmetic, and
    # masks the way XGrammar does: the token mask is a function of a small key (the families the counters allow
    # with their value bounds, a given token, the harmony guard's set), built once per key and then looked up.
    def _compile_rows(self) -> None:
        """The tables as Python lists (see ``__init__``), and each family's value range to canonicalize bounds."""
        n_fam = len(FAMILIES)
        self._next_families = [[tuple(f for f in range(n_fam) if bool(self.allowed[s, node, f]))
                                for node in range(n_fam + 1)] for s in range(len(STREAM_NAMES))]
        self._guard_of, self._copy_counted = self.guard.tolist(), self.copy_counted.tolist()
        self._close_cost, self._finish_drop = self.close_cost.tolist(), self.finish_drop.tolist()
        self._bar_cost, self._quota_family = self.bar_cost.tolist(), self.quota_family.tolist()
        self._position_family, self._position_limit = self.position_family.tolist(), self.position_limit.tolist()
        self._downbeat_first, self._rising = self.downbeat_first.tolist(), self.rising.tolist()
        self._resets = [tuple(torch.nonzero(self.resets[f]).flatten().tolist()) for f in range(n_fam)]
        self._bar_close = self.bar_close.tolist()
        self._until_form_end = tuple(torch.nonzero(self.until_form_end).flatten().tolist())
        self._token_family, self._token_value = self.token_family.tolist(), self.token_value.tolist()
        values = [[v for v, f in zip(self._token_value, self._token_family) if f == fam] or [0] for fam in range(n_fam)]
        self._value_span = [(min(v) - 1, max(v) + 1) for v in values]
        self._row_masks: dict[tuple, torch.Tensor] = {}
        self._guard_ids: dict[tuple[bytes, bytes], int] = {}
        self._guards_by_id: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _on_rows(self, state: GrammarState) -> bool:
        return state.rows is not None or state.node.shape[0] <= self.row_batch

    def _rows(self, state: GrammarState) -> list["_RowState"]:
        """The state's Python rows, read from its tensors on first use."""
        if state.rows is None:
            columns = {name: getattr(state, name).tolist() for name in _MIRRORED}
            rows = [_RowState(**{name: columns[name][i] for name in _MIRRORED}) for i in range(len(columns["node"]))]
            if state.has_guard:
                bars = state.guard_pitch_at.shape[1] // self.vocab.max_positions
                for i, row in enumerate(rows):
                    chords, pitch_sets, pitch_at = state.guard_chords[i], state.guard_pitch_sets[i], \
                        state.guard_pitch_at[i]
                    if bool(chords.all()) and bool((pitch_at < 0).all()):
                        continue   # an unguarded row of a guarded batch
                    key = (chords.cpu().numpy().tobytes(), pitch_sets.cpu().numpy().tobytes())
                    if key not in self._guard_ids:
                        self._guard_ids[key] = len(self._guards_by_id)
                        self._guards_by_id.append((chords, pitch_sets))
                    row.guard_id, row.pitch_at, row.pitch_at_bars = self._guard_ids[key], pitch_at.tolist(), bars
            state.rows, state.family_cache = rows, None
        return state.rows

    def _row_to_finish(self, r: "_RowState") -> int:
        """``tokens_to_finish`` of one row."""
        if r.node == _END:
            return 0
        later = r.bars_after[min(r.section, len(r.bars_after) - 1)] if r.section < r.n_sections else 0
        bar = min(r.bar, len(r.quota_after) - 1)
        return ((r.bars_left + later) * self._bar_cost[r.stream] + (r.n_sections - r.section) + 1 + r.quota_left
                + r.quota_after[bar] + r.forced_extra_after[bar] + (r.forced_end - r.forced_next))

    def _row_families(self, r: "_RowState") -> tuple[int, ...]:
        """``family_mask`` of one row, as the allowed families (copies ending early are ended here as there)."""
        if r.families is not None:
            return r.families
        s = r.stream
        closed = r.bars_left == 0 and r.quota_left == 0
        guards = (True, r.bars_left > 0 and r.quota_left == 0, closed and r.section < r.n_sections,
                  closed and r.section == r.n_sections, r.quota_left > 0, r.bar > 1,
                  r.at_position < self._position_limit[s])
        guard_of = self._guard_of[s]
        allowed = [f for f in self._next_families[s][r.node] if guards[guard_of[f]]]
        forcing = r.forced_next < r.forced_end
        if forcing:
            given = r.forced_tokens[min(r.forced_next, len(r.forced_tokens) - 1)]
            family, value = self._token_family[given], self._token_value[given]
            if r.in_copied_bar and not (family in allowed and r.low[family] < value < r.high[family]):
                r.forced_end, r.in_forced_bar, r.in_copied_bar, forcing = r.forced_next, False, False, False
        if forcing:
            r.families = (family,) if family in allowed else ()
            return r.families
        if r.node != _END:   # a finished row pads with <End> whatever its budget
            room = r.budget - 1 - self._row_to_finish(r)
            close_cost, finish_drop, counted = self._close_cost[s], self._finish_drop[s], self._copy_counted[s]
            copies = r.copies_of_open_bar
            if copies:
                length = r.bar_length[min(r.bar, len(r.bar_length) - 1)]
                minimum = self._bar_cost[s] - 1
            kept = []
            for f in allowed:
                after = room - close_cost[f]
                if copies and counted[f]:
                    after -= copies * (max(0, length + 1 + close_cost[f] - minimum) - max(0, length - minimum))
                if after >= -finish_drop[f]:
                    kept.append(f)
            allowed = kept
        if r.in_forced_bar:   # after a forced bar's content only what closes the bar may come
            allowed = [f for f in allowed if self._bar_close[f]]
        r.families = tuple(allowed)
        return r.families

    def _given(self, r: "_RowState") -> int:
        """The row's next given token, or -1 when none is."""
        if r.forced_next < r.forced_end:
            return r.forced_tokens[min(r.forced_next, len(r.forced_tokens) - 1)]
        return -1

    def _row_accepts(self, r: "_RowState", token: int) -> bool:
        family, value = self._token_family[token], self._token_value[token]
        families = self._row_families(r)
        given = self._given(r)
        return family in families and r.low[family] < value < r.high[family] and (given < 0 or token == given)

    def _mask_rows(self, state: GrammarState) -> torch.Tensor:
        masks = []
        for r in self._rows(state):
            families = self._row_families(r)
            given = self._given(r)
            if given >= 0:
                key = ("given", given if self._row_accepts(r, given) else -1)
            else:
                # Bounds outside a family's values allow the same tokens as its span's ends: one key for them all.
                bounds = tuple((f, max(r.low[f], self._value_span[f][0]), min(r.high[f], self._value_span[f][1]))
                               for f in families)
                if r.guard_id >= 0:
                    positions = self.vocab.max_positions
                    onset = min(r.bar, r.pitch_at_bars - 1) * positions + max(r.low[_FAMILY["Pos"]], 0)
                    key = ("guarded", bounds, r.guard_id, r.pitch_at[onset])
                else:
                    key = ("free", bounds)
            mask = self._row_masks.get(key)
            if mask is None:
                if len(self._row_masks) >= ROW_MASK_CACHE:
                    self._row_masks.clear()
                mask = self._row_masks[key] = self._build_row_mask(key)
            masks.append(mask)
        return torch.stack(masks)

    def _build_row_mask(self, key: tuple) -> torch.Tensor:
        """[vocab] bool: the tokens a row mask key allows (once per key): ("given", token or -1), ("free", bounds)
        or ("guarded", bounds, guard, pitch set), bounds being (family, low, high) per allowed family."""
        mask = torch.zeros(len(self.vocab), dtype=torch.bool, device=self.device)
        if key[0] == "given":
            if key[1] >= 0:
                mask[key[1]] = True
            return mask
        for family, low, high in key[1]:
            mask |= (self.token_family == family) & (self.token_value > low) & (self.token_value < high)
        if key[0] == "guarded":
            guard_id, pitch_set = key[2:]
            chords, pitch_sets = self._guards_by_id[guard_id]
            guarded = mask.clone()
            guarded[self.chord_ids] &= chords
            if pitch_set >= 0:
                n_pitches = self.pitch_ids.stop - self.pitch_ids.start
                guarded[self.pitch_ids] &= pitch_sets[pitch_set * n_pitches:(pitch_set + 1) * n_pitches]
            if bool(guarded.any()):
                mask = guarded
        return mask

    def _row_step(self, r: "_RowState", token: int, active: bool) -> bool:
        """``step`` of one row."""
        if not (active and self._row_accepts(r, token)):
            r.families = None
            return False
        s, family, value = r.stream, self._token_family[token], self._token_value[token]
        r.node = family
        r.budget -= 1
        if family == _FAMILY["Sec"]:
            r.bars_left = r.section_bars[min(r.section, len(r.section_bars) - 1)]
            r.section += 1
            following = r.section_values[min(r.section, len(r.section_values) - 1)]
            r.low[family], r.high[family] = following - 1, following + 1
        if r.history_base >= 0 and not self._bar_close[family] and r.bar > 0:
            self._row_write_history(r, token, family)
        if r.forced_next < r.forced_end:
            r.forced_next += 1
        if family == _FAMILY["Bar"]:
            r.bars_left -= 1
            r.bar += 1
            index = min(r.bar, len(r.forced_start) - 1)
            length, start = r.forced_length[index], r.forced_start[index]
            r.in_forced_bar, r.forced_next, r.forced_end = length >= 0, start, start + max(length, 0)
            r.bar_offset[index] = r.written
            source = r.copy_source[index]
            r.in_copied_bar = source > 0
            if source > 0:
                r.forced_next = r.history_base + r.bar_offset[source]
                r.forced_end = r.forced_next + r.bar_length[source]
                r.in_forced_bar = True
            r.copies_of_open_bar = r.copy_source.count(r.bar)
            r.quota_left = r.quotas[min(r.bar, len(r.quotas) - 1)]
            if self._downbeat_first[s]:
                r.high[_FAMILY["Pos"]] = 1
        elif family == _FAMILY["Sec"] or family == _END:
            r.in_forced_bar = r.in_copied_bar = False
        if family == self._quota_family[s]:
            r.quota_left -= 1
        if family == _FAMILY["Pos"]:
            r.high[family] = r.positions
            r.at_position = 0
            later = r.bars_after[min(r.section, len(r.bars_after) - 1)] if r.section < r.n_sections else 0
            steps_left = (r.bars_left + later) * r.positions + r.positions - value
            for bounded in self._until_form_end:
                r.high[bounded] = steps_left + 1
        elif family == self._position_family[s]:
            r.at_position += 1
        if self._rising[family]:
            r.low[family] = value
        for reset in self._resets[family]:
            r.low[reset] = -1
        r.families = None
        return True

    def _row_write_history(self, r: "_RowState", token: int, family: int) -> None:
        """``_write_history`` of one row."""
        where = r.history_base + r.written
        if where >= len(r.forced_tokens):
            r.forced_tokens.extend([0] * len(r.forced_tokens))
        r.forced_tokens[where] = token
        r.written += 1
        bar = min(r.bar, len(r.bar_length) - 1)
        r.bar_length[bar] += 1
        if r.bar_length[bar] > self._bar_cost[r.stream] - 1 and self._copy_counted[r.stream][family]:
            later = 0   # bars after k that copy the open bar, for k from the last down
            for k in range(len(r.copy_source) - 1, -1, -1):
                r.forced_extra_after[k] += later
                later += r.copy_source[k] == r.bar

    # -- validation --------------------------------------------------------------------------------------------
    def validate(self, ids: list[int], stream: str, plan: Plan) -> list[GrammarError]:
        return self.validate_batch([ids], [stream], [plan])[0]

    def validate_batch(self, sequences: list[list[int]], streams: list[str], plans: list[Plan],
                       chunk_size: int = 2048) -> list[list[GrammarError]]:
        """Errors per sequence (index, token, reason); an empty list means the sequence is grammatical.

        A rejected token is reported and skipped, so one sequence can show several errors. Sequences run in
        chunks of similar length so that short ones do not wait for the longest.
        """
        errors: list[list[GrammarError]] = [[] for _ in sequences]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        with small_tensor_threads(self.device):
            for start in range(0, len(order), chunk_size):
                rows = order[start:start + chunk_size]
                found = self._validate_chunk([sequences[i] for i in rows], [streams[i] for i in rows],
                                             [plans[i] for i in rows])
                for i, row_errors in zip(rows, found):
                    errors[i] = row_errors
        return errors

    def _validate_chunk(self, sequences: list[list[int]], streams: list[str], plans: list[Plan]) -> list[list[GrammarError]]:
        errors: list[list[GrammarError]] = [[] for _ in sequences]
        state = self.start(streams, plans)
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        longest = max(len(s) for s in sequences)
        padded = torch.zeros((len(sequences), max(longest, 1)), dtype=torch.long)
        for i, seq in enumerate(sequences):
            padded[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        padded = padded.to(self.device)
        for t in range(longest):
            active = t < lengths
            tokens = padded[:, t]
            finished = state.done & active
            ok = self.step(state, tokens, active & ~finished)
            bad = active & (~ok | finished)
            if bool(bad.any()):
                for i in torch.nonzero(bad).flatten().tolist():
                    token = int(tokens[i])
                    reason = "token after <End>" if finished[i] else self.explain(state, i, token)
                    errors[i].append(GrammarError(t, self.vocab.tokens[token], reason))
        for i in torch.nonzero(~state.done).flatten().tolist():
            errors[i].append(GrammarError(len(sequences[i]), "", self._unfinished(state, i)))
        return errors

    def explain(self, state: GrammarState, i: int, token: int) -> str:
        """Why row ``i`` may not emit ``token`` now (for error messages; not on the hot path)."""
        state.sync()
        row = state.row(i)
        stream = STREAM_NAMES[row["stream"]]
        fam = self.vocab.family[token]
        forcing, given = self._next_forced(state)
        if bool(forcing[i]):
            if token != int(given[i]):
                return f"bar {row['bar']} is given: its next token is {self.vocab.tokens[int(given[i])]}"
        elif bool(state.in_forced_bar[i]) and fam not in _BAR_CLOSE:
            return f"bar {row['bar']} is given and complete: only <Bar>, <Sec_..> or <End> may follow"
        prev = "the start" if row["node"] == _START else f"<{FAMILIES[row['node']]}..>"
        allowed = [FAMILIES[f] for f in range(len(FAMILIES)) if self.allowed[row["stream"], row["node"], f]]
        if fam not in allowed:
            return f"a {fam} token cannot follow {prev} in a {stream} body (expected {' or '.join(allowed)})"
        guard = GUARD_NAMES[int(self.guard[row["stream"], _FAMILY[fam]])]
        if not bool(self._guards(state)[i, GUARD_NAMES.index(guard)]):
            return self._guard_reason(guard, row, stream, fam)
        if not bool(self._within_budget(state)[i, _FAMILY[fam]]):
            return f"only {int(state.budget[i])} token(s) of budget left: the form must close"
        value, low, high = self.vocab.value[token], int(state.low[i, _FAMILY[fam]]), int(state.high[i, _FAMILY[fam]])
        if fam == "Sec":
            return f"section {row['section'] + 1} of the form must be {self.vocab.tokens[self.first_sec + low + 1]}"
        if fam == "Pos" and high == 1:
            return f"a bar of a {stream} body opens on its downbeat, <Pos_0>"
        if fam == "Pos":
            return f"position {value} must come after position {low} and before {high} (positions per bar)"
        if fam == "Track":
            return "tracks at one position come once each, in the order MELODY, BRIDGE, PIANO"
        if fam == "Pitch":
            return f"pitches at one onset must rise: {value} after {low}"
        if fam in UNTIL_FORM_END:
            return f"{fam} {value} passes the form's end ({high - 1} step(s) left)"
        return f"value {value} outside ({low}, {high})"

    @staticmethod
    def _guard_reason(guard: str, row: dict, stream: str, fam: str) -> str:
        if row["quota_left"] > 0 and guard != "quota_left":
            return f"{row['quota_left']} more velocity token(s) are owed in bar {row['bar']}"
        if guard == "bar_left":
            return f"section {row['section']} of the form already has all its bars"
        if guard == "section_next":
            if row["bars_left"] > 0:
                return f"section {row['section']} still needs {row['bars_left']} bar(s)"
            return f"the form has only {row['n_sections']} sections"
        if guard == "after_first_bar":
            return "a body's first bar takes an absolute <Tempo_..>, not a change"
        if guard == "position_room":
            return f"a position of a {stream} body holds at most {PER_POSITION[stream][1]} {fam} tokens"
        if guard == "form_done":
            if row["bars_left"] > 0:
                return f"cannot end: section {row['section']} still needs {row['bars_left']} bar(s)"
            return f"cannot end: {row['n_sections'] - row['section']} section(s) of the form are missing"
        return f"bar {row['bar']} has no note left to give a velocity"

    def _unfinished(self, state: GrammarState, i: int) -> str:
        row = state.row(i)
        return (f"sequence ends without <End> at section {row['section']}/{row['n_sections']} with "
                f"{row['bars_left']} bar(s) left in it")


class _RowState:
    """One row of a GrammarState as Python ints and lists (the _MIRRORED fields), for the row engine."""

    __slots__ = _MIRRORED + ("families", "guard_id", "pitch_at", "pitch_at_bars")

    def __init__(self, **fields):
        for name, value in fields.items():
            setattr(self, name, value)
        self.families: tuple[int, ...] | None = None   # _row_families of the current state
        self.guard_id, self.pitch_at, self.pitch_at_bars = -1, [], 1


def example_bodies(example, vocab: Vocabulary) -> list[tuple[str, list[int], str, Plan]]:
    """(name, tokens, stream, plan) of every body of an example: each prompt input, then the target."""
    header = decode_header(example.prompt, vocab)
    plan = Plan.from_prompt(example.prompt, vocab)
    end = vocab.token("End")
    bodies = [(name, ids + [end], name) for name, ids in header.inputs.items()]
    bodies.append(("target", list(example.target), TASK_TARGET[header.task]))
    return [(name, ids, stream, plan if stream == "dynamics" else Plan(plan.sections, plan.metre))
            for name, ids, stream in bodies]


def validate_examples(grammar: Grammar, examples: list) -> list[dict[str, list[GrammarError]]]:
    """Errors in every body of every example (batched), keyed by body name ("target" or the input's)."""
    bodies = [(k, body) for k, example in enumerate(examples) for body in example_bodies(example, grammar.vocab)]
    errors = grammar.validate_batch([b[1] for _, b in bodies], [b[2] for _, b in bodies], [b[3] for _, b in bodies])
    result: list[dict[str, list[GrammarError]]] = [{} for _ in examples]
    for (k, body), found in zip(bodies, errors):
        result[k][body[0]] = found
    return result
