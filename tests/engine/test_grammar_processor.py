"""The grammar as a vLLM v1 logits processor, driven step by step as vLLM's model runner drives it: requests join,
leave and move in the running batch (BatchUpdate), tokens are drawn from the masked logits of random "models" and
appended to each request's output list, which the processor reads. No engine: fast, and every step is checked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from musicray.engine.decode import allowed_tokens  # noqa: E402
from musicray.engine.grammar_processor import (  # noqa: E402
    EXTRA_ARGS_KEY, GrammarLogitsProcessor, grammar_args, read_grammar_args)
from musicray.grammar import Grammar, Plan  # noqa: E402
from musicray.model import load_music_model  # noqa: E402
from musicray.run import RunDir  # noqa: E402
from musicray.song import parse_form  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_random_run):
    run = tmp_path_factory.mktemp("processor") / "run"
    make_random_run(run, [], tmp_path_factory.mktemp("cache"))
    return RunDir(run).stage1_model


@pytest.fixture(scope="module")
def music(model_dir):
    return load_music_model(model_dir)[1]


def processor(model_dir) -> GrammarLogitsProcessor:
    config = SimpleNamespace(model_config=SimpleNamespace(model=str(model_dir)))
    return GrammarLogitsProcessor(config, torch.device("cpu"), False)


def params(stream: str, form: str, budget: int, metre: str = "4/4", forced=(), copies=()) -> SamplingParams:
    plan = Plan(tuple(parse_form(form)), metre, forced=forced, copies=copies)
    return SamplingParams(max_tokens=budget + 1, extra_args={EXTRA_ARGS_KEY: grammar_args(stream, plan, budget)})


class Batch:
    """vLLM's persistent batch, reduced to what a logits processor sees: rows, their params and output lists."""

    def __init__(self, proc: GrammarLogitsProcessor, vocab_size: int, seed: int = 0):
        self.proc, self.vocab_size = proc, vocab_size
        self.rows: list[dict | None] = []
        self.finished: list[dict] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.pending_added, self.pending_removed, self.pending_moved = [], [], []

    def add(self, name: str, sampling: SamplingParams | None) -> None:
        row = {"name": name, "params": sampling, "output": []}
        index = next((i for i, r in enumerate(self.rows) if r is None), len(self.rows))
        if index == len(self.rows):
            self.rows.append(row)
        else:
            self.rows[index] = row
        self.pending_added.append((index, sampling, [1, 2, 3], row["output"]))

    def remove(self, index: int) -> None:
        self.finished.append(self.rows[index])
        self.rows[index] = None
        self.pending_removed.append(index)

    def condense(self) -> None:
        """Fill holes with the last rows, as vLLM's InputBatch.condense does (one-way moves)."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        while None in self.rows:
            hole, last = self.rows.index(None), len(self.rows) - 1
            self.rows[hole] = self.rows.pop()
            self.pending_moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
            while self.rows and self.rows[-1] is None:
                self.rows.pop()

    def swap(self, a: int, b: int) -> None:
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        self.pending_moved.append((a, b, MoveDirectionality.SWAP))

    def step(self) -> None:
        update = None
        if self.pending_added or self.pending_removed or self.pending_moved:
            update = BatchUpdate(len(self.rows), self.pending_removed, self.pending_added, self.pending_moved)
            self.pending_added, self.pending_removed, self.pending_moved = [], [], []
        self.proc.update_state(update)
        logits = torch.randn(len(self.rows), self.vocab_size, generator=self.generator) * 4
        masked = self.proc.apply(logits.clone())
        drawn = torch.multinomial(torch.softmax(masked, -1), 1, generator=self.generator)[:, 0]
        for row, token in zip(self.rows, drawn.tolist()):
            row["output"].append(token)


def check_rows(rows: list[dict], music, grammar: Grammar) -> None:
    for row in rows:
        args = row["params"].extra_args[EXTRA_ARGS_KEY]
        stream, plan, budget = read_grammar_args(args)
        output = row["output"]
        assert output[-1] == music.eot_id, (row["name"], "no <|eot_id|> at the end")
        body = music.from_llm(output[:-1])
        assert len(body) == len(output) - 1, "only music tokens before the end of turn"
        assert len(body) <= budget
        assert grammar.validate(body, stream, plan) == [], row["name"]
        sections = [music.vocab.tokens[t] for t in body if music.vocab.family[t] == "Sec"]
        assert sections == [f"<Sec_{s.label}{s.bars}>" for s in plan.sections]
        assert sum(music.vocab.family[t] == "Bar" for t in body) == plan.n_bars


def run_until_done(batch: Batch, music, arrivals: dict[int, list[tuple[str, SamplingParams]]],
                   shuffle_every: int = 0) -> None:
    """Step the batch; requests join at their step, finish at <|eot_id|> (removed, batch condensed)."""
    step = 0
    while step <= max(arrivals) or any(r is not None for r in batch.rows):
        for name, sampling in arrivals.get(step, []):
            batch.add(name, sampling)
        batch.condense()
        if shuffle_every and step % shuffle_every == 0 and len(batch.rows) > 2:
            batch.swap(0, len(batch.rows) - 1)
        if batch.rows:
            batch.step()
        for i, row in enumerate(batch.rows):
            if row is not None and row["output"][-1] == music.eot_id:
                batch.remove(i)
        step += 1
        assert step < 5000, "a row never finished"


def test_rows_joining_and_leaving_stay_grammatical_with_exact_forms(model_dir, music):
    """Random logits (the worst model): every request, whenever it joins and wherever it moves, writes its exact
    form and closes within its budget."""
    proc = processor(model_dir)
    grammar = Grammar(music.vocab)
    vocab_size = music.offset + len(music.vocab) + 7   # the LLM vocabulary is wider than the music block
    arrivals = {
        0: [("chord-A4B4", params("chord", "A4B4", 60)), ("melody-i2A8", params("melody", "i2A8", 140))],
        2: [("tempo-A2B2", params("tempo", "A2B2", 20)), ("secondary-A3", params("secondary", "A3", 60))],
        5: [("melody-3/4", params("melody", "A2b1", 60, metre="3/4"))],
        9: [("chord-long", params("chord", "i4A8B8A8B8x4A8B8B8o4", 68 * 5))],
    }
    batch = Batch(proc, vocab_size, seed=1)
    run_until_done(batch, music, arrivals, shuffle_every=3)
    assert len(batch.finished) == 6
    check_rows(batch.finished, music, grammar)


def test_the_batch_mask_is_the_native_loops_mask(model_dir, music):
    """Row by row, the processor's mask equals ``allowed_tokens`` of a grammar state stepped through the same
    tokens in a batch of its own: the same tables, one decision."""
    proc = processor(model_dir)
    grammar = Grammar(music.vocab)
    vocab_size = music.offset + len(music.vocab) + 3
    batch = Batch(proc, vocab_size, seed=5)
    specs = [("melody", "A2B2", 80), ("dynamics", "A1", 30), ("chord", "A2", 20)]
    plans = []
    for stream, form, budget in specs:
        sampling = params(stream, form, budget)
        if stream == "dynamics":   # a quota: three notes to give velocities to in its one bar
            plan = Plan(tuple(parse_form(form)), "4/4", (3,))
            sampling.extra_args[EXTRA_ARGS_KEY] = grammar_args(stream, plan, budget)
        plans.append(read_grammar_args(sampling.extra_args[EXTRA_ARGS_KEY]))
        batch.add(stream, sampling)
    for _ in range(12):
        batch.step()
        proc.update_state(None)   # step the processor to the rows' latest token without drawing another
        logits = torch.zeros(len(batch.rows), vocab_size)
        mask = proc.apply(logits.clone()) == 0
        for i, ((stream, plan, budget), row) in enumerate(zip(plans, batch.rows)):
            state = grammar.start([stream], [plan], [budget])
            for token in row["output"]:
                if music.is_music(token):
                    grammar.step(state, torch.tensor([token - music.offset]))
            assert torch.equal(mask[i], allowed_tokens(grammar, state, music, vocab_size)[0]), (stream, row["output"])
        if any(row["output"][-1] == music.eot_id for row in batch.rows):
            break


def test_requests_without_the_grammar_pass_unmasked(model_dir, music):
    proc = processor(model_dir)
    vocab_size = music.offset + len(music.vocab)
    batch = Batch(proc, vocab_size)
    batch.add("free", SamplingParams(max_tokens=5))
    batch.add("masked", params("tempo", "A1", 4))
    batch.step()
    logits = torch.randn(2, vocab_size)
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0])
    assert torch.isinf(out[1]).sum() == vocab_size - 1    # the first token of a body: only <Sec_A1>


def test_forced_bars_are_written_as_given(model_dir, music):
    """Infilling's forced bars reach the processor through the request: the kept bar comes out token for token."""
    vocab = music.vocab
    kept = (vocab.token("Pos", 0), vocab.token("Chord", "V:maj"))
    proc = processor(model_dir)
    batch = Batch(proc, music.offset + len(vocab), seed=3)
    batch.add("infill", params("chord", "A2", 30, forced=((2, kept),)))
    run_until_done(batch, music, {0: []})
    body = music.from_llm(batch.finished[0]["output"][:-1])
    bars = [i for i, t in enumerate(body) if vocab.family[t] == "Bar"]
    assert tuple(body[bars[1] + 1:bars[1] + 1 + len(kept)]) == kept and body[-1] == vocab.token("End")


def test_copied_bars_repeat_their_source(model_dir, music):
    """A returning section's copied bars reach the processor through the request: bars 4 and 5 repeat 1 and 2 (four
    bars follow them, so that no copied note can pass the form's end)."""
    vocab = music.vocab
    proc = processor(model_dir)
    batch = Batch(proc, music.offset + len(vocab), seed=5)
    batch.add("returns", params("melody", "A2B1A2B4", 300, copies=((4, 1), (5, 2))))
    run_until_done(batch, music, {0: []})
    body = music.from_llm(batch.finished[0]["output"][:-1])
    bars = []
    for token in body:
        if vocab.family[token] == "Bar":
            bars.append([])
        elif vocab.family[token] in ("Sec", "End"):
            continue
        elif bars:
            bars[-1].append(token)
    assert len(bars) == 9 and bars[3] == bars[0] and bars[4] == bars[1] and body[-1] == vocab.token("End")


@pytest.mark.parametrize("args,message", [
    ({"stream": "chord", "sections": [["A", 2]], "metre": "4/4", "budget": 9, "copies": [[2, 2]]}, "copied bar"),
    ({"stream": "chord", "sections": [["A", 2]], "metre": "4/4", "budget": 9, "copies": [[3, 1]]}, "copied bar"),
    ({"stream": "chord", "sections": [["A", 2]], "metre": "4/4", "budget": 9, "copies": [["x", 1]]}, "malformed"),
    ({"stream": "drums", "sections": [["A", 2]], "metre": "4/4", "budget": 9}, "unknown stream"),
    ({"stream": "chord", "sections": [["A", "two"]], "metre": "4/4", "budget": 9}, "malformed"),
    ({"stream": "chord", "metre": "4/4", "budget": 9}, "malformed"),
    ({"stream": "chord", "sections": [["A", 2]], "metre": "4/4", "budget": 9, "forced": [[9, [1]]]}, "forced bars"),
    ({"stream": "chord", "sections": [["Q", 2]], "metre": "4/4", "budget": 9}, "sections"),
    ({"stream": "dynamics", "sections": [["A", 2]], "metre": "4/4", "budget": 9, "quotas": [3]}, "quotas"),
])
def test_malformed_grammar_arguments_are_refused_before_the_engine_runs(args, message):
    with pytest.raises(ValueError, match=message):
        GrammarLogitsProcessor.validate_params(SamplingParams(extra_args={EXTRA_ARGS_KEY: args}))


def test_a_budget_too_small_for_its_form_ends_that_row_and_spares_the_others(model_dir, music):
    """What only the grammar can check (the budget against the form) is found inside the engine: the row may only
    end at once, its answer then fails the caller's check, and the other rows go on as if it were not there."""
    proc = processor(model_dir)
    grammar = Grammar(music.vocab)
    batch = Batch(proc, music.offset + len(music.vocab), seed=2)
    run_until_done(batch, music, {0: [("too small", params("melody", "A8B8", 5)),
                                      ("fine", params("chord", "A2", 20))]})
    outputs = {row["name"]: row for row in batch.finished}
    assert outputs["too small"]["output"] == [music.eot_id]
    check_rows([outputs["fine"]], music, grammar)


def test_the_harmony_guard_reaches_the_processor(model_dir, music):
    """A guarded plan crosses as JSON and the processor masks by it: chords from the guard's list only, pitches
    from the set of the chord sounding at their onset, while an unguarded row of the same batch is free."""
    from musicray.harmony_guard import guard_plan
    from musicray.song import TRACKS, Chord, Song, Tempo

    vocab = music.vocab
    song = Song("s", "Bb:min", "4/4", parse_form("A2B1"), chords=[Chord(0, 0, "Bb:min"), Chord(1, 8, "F:7")],
                tracks={name: [] for name in TRACKS}, tempos=[Tempo(0, 0, 100.0)])
    form = Plan(tuple(song.sections), song.metre)
    guarded = {stream: guard_plan(form, stream, song, vocab) for stream in ("chord", "melody")}
    for stream, plan in guarded.items():
        assert read_grammar_args(grammar_args(stream, plan, 99)) == (stream, plan, 99)
    proc = processor(model_dir)
    batch = Batch(proc, music.offset + len(vocab), seed=4)
    arrivals = {0: [(stream, SamplingParams(max_tokens=200,
                                            extra_args={EXTRA_ARGS_KEY: grammar_args(stream, plan, 199)}))
                    for stream, plan in guarded.items()] + [("free", params("melody", "A2B1", 199))]}
    run_until_done(batch, music, arrivals)
    check_rows(batch.finished, music, Grammar(vocab))
    bodies = {row["name"]: music.from_llm(row["output"][:-1]) for row in batch.finished}
    chords = [t for t in bodies["chord"] if vocab.family[t] == "Chord"]
    assert chords and set(chords) <= set(guarded["chord"].guard_chords)
    plan = guarded["melody"]

    def pitches_outside(body):
        bar = position = outside = 0
        for token in body:
            family = vocab.family[token]
            if family == "Bar":
                bar, position = bar + 1, 0
            elif family == "Pos":
                position = vocab.value[token]
            elif family == "Pitch":
                k = [k for b, p, k in plan.guard_pitch_changes if (b, p) <= (bar, position)][-1]
                outside += vocab.value[token] not in plan.guard_pitch_sets[k]
        return outside

    assert any(vocab.family[t] == "Pitch" for t in bodies["melody"]) and pitches_outside(bodies["melody"]) == 0
    assert pitches_outside(bodies["free"]) > 0


@pytest.mark.parametrize("guard,message", [
    ({"guard_pitch_sets": [[60]], "guard_pitch_changes": [[3, 0, 0]]}, "guard_pitch_changes"),
    ({"guard_pitch_sets": [[60]], "guard_pitch_changes": [[1, 0, 1]]}, "guard_pitch_changes"),
    ({"guard_pitch_sets": [[60]], "guard_pitch_changes": [[1, 0]]}, "malformed"),
    ({"guard_chords": ["I:maj"]}, "malformed"),
])
def test_malformed_guard_arguments_are_refused(guard, message):
    args = {"stream": "melody", "sections": [["A", 2]], "metre": "4/4", "budget": 40, **guard}
    with pytest.raises(ValueError, match=message):
        GrammarLogitsProcessor.validate_params(SamplingParams(extra_args={EXTRA_ARGS_KEY: args}))
