"""The grammar automaton: real encodings validate, random logits through the mask stay grammatical, and
hand-made invalid sequences get the expected error."""

import dataclasses
import random

import pytest
import torch

from musicray.encoding import decode_body, encode
from musicray.grammar import (STREAM_NAMES, Grammar, Plan, example_bodies, small_tensor_threads,
                              validate_examples)
from musicray.quantize import quantized
from musicray.song import METRES, SECTION_LABELS, Section, Song, SongError, metre, parse_form
from musicray.streams import STREAMS
from musicray.tokens import SUBTASKS, TASKS, Vocabulary

VOCAB = Vocabulary()
GRAMMAR = Grammar(VOCAB)


def random_plan(rng: random.Random, stream: str) -> Plan:
    sections = tuple(Section(rng.choice(SECTION_LABELS), rng.randint(1, 3)) for _ in range(rng.randint(1, 3)))
    n_bars = sum(s.bars for s in sections)
    quotas = tuple(rng.randint(0, 4) for _ in range(n_bars)) if stream == "dynamics" else ()
    return Plan(sections, rng.choice(list(METRES)), quotas)


def sample_through_mask(streams, plans, seed: int, max_steps: int = 5000, budgets=None) -> list[list[int]]:
    """Sample from random logits, masked by the grammar, until every row has emitted <End>."""
    generator = torch.Generator().manual_seed(seed)
    state = GRAMMAR.start(streams, plans, budgets)
    end = VOCAB.token("End")
    steps = []
    for _ in range(max_steps):
        if bool(state.done.all()):
            break
        # The argmax of i.i.d. random logits is a uniform draw among the tokens the mask leaves.
        logits = torch.rand(len(streams), len(VOCAB), generator=generator)
        tokens = logits.masked_fill(~GRAMMAR.mask(state), -1.0).argmax(-1)
        assert bool(GRAMMAR.step(state, tokens).all()), "the mask allowed a token that step rejects"
        steps.append(tokens)
    assert bool(state.done.all()), "sampling through the mask did not end"
    rows = []
    for row in torch.stack(steps, 1).tolist():
        rows.append(row[:row.index(end) + 1])  # finished rows pad with <End>
    return rows


def test_ten_thousand_masked_samples_are_grammatical_and_end():
    rng = random.Random(0)
    streams = [STREAM_NAMES[i % len(STREAM_NAMES)] for i in range(10_000)]
    plans = [random_plan(rng, s) for s in streams]
    sequences = []
    with small_tensor_threads("cpu"):
        for start in range(0, len(streams), 1000):  # batches small enough to stay in cache
            sequences += sample_through_mask(streams[start:start + 1000], plans[start:start + 1000], seed=start)
    errors = GRAMMAR.validate_batch(sequences, streams, plans)
    assert sum(map(len, errors)) == 0, [e for e in errors if e][:3]
    # The form is exact: one Sec per section in order, and the planned number of bars.
    bar, sec = VOCAB.token("Bar"), set(VOCAB.ids_of["Sec"])
    for seq, plan in zip(sequences, plans):
        assert [VOCAB.tokens[t] for t in seq if t in sec] == [f"<Sec_{s.label}{s.bars}>" for s in plan.sections]
        assert seq.count(bar) == plan.n_bars
    # The melody holds at most two pitches at an onset (PER_POSITION), counted here apart from the grammar.
    pos, pitch = set(VOCAB.ids_of["Pos"]), set(VOCAB.ids_of["Pitch"])
    for seq, stream in zip(sequences, streams):
        if stream == "melody":
            per_onset, most = 0, 0
            for token in seq:
                per_onset = 0 if token in pos or token == bar else per_onset + (token in pitch)
                most = max(most, per_onset)
            assert most <= 2, [VOCAB.tokens[t] for t in seq]
    # Grammatical means decodable: every body (but dynamics, which needs its notes) becomes a valid song.
    for seq, stream, plan in zip(sequences, streams, plans):
        if stream != "dynamics":
            song = Song("sampled", "C:maj", plan.metre, list(plan.sections))
            decode_body(seq[:-1], stream, song, VOCAB)
            song.check()


def test_a_token_budget_always_closes_the_form_in_time():
    rng = random.Random(5)
    streams = [STREAM_NAMES[i % len(STREAM_NAMES)] for i in range(700)]
    plans = [random_plan(rng, s) for s in streams]
    minimum = GRAMMAR.tokens_to_finish(GRAMMAR.start(streams, plans)).tolist()
    budgets = [m + rng.choice([0, 1, 2, 5, 20]) for m in minimum]
    with small_tensor_threads("cpu"):
        sequences = sample_through_mask(streams, plans, seed=5, budgets=budgets)
    assert all(len(seq) <= budget for seq, budget in zip(sequences, budgets))
    assert sum(map(len, GRAMMAR.validate_batch(sequences, streams, plans))) == 0
    tight = [seq for seq, m, b in zip(sequences, minimum, budgets) if b == m]
    assert tight  # some rows ran on the exact minimum and still closed their form


def test_a_budget_too_small_for_the_form_is_refused():
    with pytest.raises(ValueError, match="budget"):
        GRAMMAR.start(["tempo"], [PLAN], budgets=[5])  # A2B1 needs 2 Sec + 3 x (Bar Tempo) + End = 9
    GRAMMAR.start(["tempo"], [PLAN], budgets=[9])


def test_mask_and_accepts_agree():
    rng = random.Random(1)
    streams = list(STREAM_NAMES) * 4
    plans = [random_plan(rng, s) for s in streams]
    state = GRAMMAR.start(streams, plans)
    for _ in range(30):
        mask = GRAMMAR.mask(state)
        for token in rng.sample(range(len(VOCAB)), 50):
            accepted = GRAMMAR.accepts(state, torch.full((len(streams),), token))
            assert torch.equal(accepted, mask[:, token])
        choice = torch.multinomial(mask.float(), 1)[:, 0]
        GRAMMAR.step(state, choice)


def test_song_encodings_validate(synthetic_songs):
    examples = [encode(song, task, VOCAB) for song in synthetic_songs for task in TASKS]
    for example, errors in zip(examples, validate_examples(GRAMMAR, examples)):
        assert all(not e for e in errors.values()), (example.song_id, example.task, errors)


def test_every_stream_has_a_graph_and_an_encoding():
    assert set(STREAM_NAMES) == set(STREAMS)
    assert set(SUBTASKS) <= set(STREAM_NAMES)


PLAN = Plan(tuple(parse_form("A2B1")), "4/4", ())
PLAN_DYN = Plan(tuple(parse_form("A1B1")), "4/4", (2, 1))
INVALID = [
    # (stream, plan, tokens, index of first error, words in the reason)
    ("melody", PLAN, "<Bar>", 0, "cannot follow the start"),
    ("melody", PLAN, "<Sec_B1>", 0, "must be <Sec_A2>"),
    ("melody", PLAN, "<Sec_A2><Bar><Sec_B1>", 2, "still needs 1 bar"),
    ("melody", PLAN, "<Sec_A2><Bar><Bar><Bar>", 3, "already has all its bars"),
    ("melody", PLAN, "<Sec_A2><Bar><Bar><End>", 3, "cannot end"),
    ("melody", PLAN, "<Sec_A2><Bar><Pos_4><Rel_60><Dur_2><Pos_4>", 5, "must come after position 4"),
    ("melody", PLAN, "<Sec_A2><Bar><Pos_0><Rel_60><Pos_2>", 4, "cannot follow <Pitch..>"),
    ("melody", PLAN, "<Sec_A2><Bar><Pos_0><Rel_64><Dur_1><Rel_60>", 5, "must rise"),
    ("melody", PLAN, "<Sec_A2><Bar><Pos_0><Vel_10>", 3, "cannot follow <Pos..>"),
    ("melody", PLAN, "<Sec_A2><Bar><Pos_0><Rel_60><Dur_1><Rel_64><Dur_1><Rel_67>", 7, "holds at most 2 Pitch"),
    ("melody", Plan(PLAN.sections, "3/4"), "<Sec_A2><Bar><Pos_12>", 2, "before 12"),
    ("song", PLAN, "<Sec_A2><Bar><Pos_0>", 2, "cannot follow <Bar..>"),
    ("song", PLAN, "<Sec_A2><Bar><Tempo_90><Pos_0><Track_MELODY><Rel_60><Dur_2><Pos_4>", 7, "cannot follow <Dur..>"),
    ("song", PLAN, "<Sec_A2><Bar><Tempo_90><Pos_0><Track_PIANO><Rel_60><Dur_2><Vel_50><Track_MELODY>", 8,
     "tracks at one position"),
    ("tempo", PLAN, "<Sec_A2><Bar><Bar>", 2, "cannot follow <Bar..>"),
    ("tempo", PLAN, "<Sec_A2><Bar><Tempo_90><Tempo_91>", 3, "cannot follow <Tempo..>"),
    ("tempo", PLAN, "<Sec_A2><Bar><TempoChange_+1>", 2, "first bar takes an absolute"),
    ("tempo", PLAN, "<Sec_A2><Bar><Tempo_90><Bar><TempoChange_+1><Sec_B1><Bar><TempoChange_0><TempoChange_0>", 8,
     "cannot follow <TempoChange..>"),
    # A note may not sound past the form's end: 3 bars of 16 steps, onset at bar 3 step 4 leaves 12 steps.
    ("melody", PLAN, "<Sec_A2><Bar><Bar><Sec_B1><Bar><Pos_4><Rel_60><Dur_13>", 7, "passes the form's end"),
    ("song", PLAN, "<Sec_A2><Bar><Tempo_90><Pos_15><Track_MELODY><Rel_60><Dur_34>", 6, "passes the form's end"),
    ("dynamics", PLAN_DYN, "<Sec_A1><Bar><Vel_50><Sec_B1>", 3, "1 more velocity"),
    ("dynamics", PLAN_DYN, "<Sec_A1><Bar><Vel_50><Vel_50><Vel_50>", 4, "no note left"),
    ("chord", PLAN, "<Sec_A2><Bar><Pos_0><Chord_I:maj><Chord_V:maj>", 4, "cannot follow <Chord..>"),
    ("chord", PLAN, "<Sec_A2><Bar><Pos_0><Chord_N><Bass_3>", 4, "cannot follow <NoChord..>"),
    ("chord", PLAN, "<Sec_A2><Bar><Pos_0><Chord_N><Bar><Pos_0><Chord_N><Sec_B1><Bar><Pos_0><Chord_N><End><Bar>", 12,
     "after <End>"),
    # A chord bar opens on its downbeat, restating the sounding chord (a bar says all that sounds in it).
    ("chord", PLAN, "<Sec_A2><Bar><Pos_0><Chord_I:maj><Bar><Pos_4>", 5, "opens on its downbeat"),
    ("chord", PLAN, "<Sec_A2><Bar><Pos_0><Chord_I:maj><Bar><Bar>", 5, "cannot follow <Bar..>"),
]


@pytest.mark.parametrize("stream,plan,text,index,reason", INVALID, ids=[f"{r[0]}:{r[2][-30:]}" for r in INVALID])
def test_invalid_sequences_get_the_expected_error(stream, plan, text, index, reason):
    errors = GRAMMAR.validate(VOCAB.parse(text), stream, plan)
    assert errors, "expected an error"
    assert errors[0].index == index, errors
    assert reason in errors[0].reason, errors[0].reason


@pytest.mark.parametrize("text", ["<Sec_A2><Bar>", "<Sec_A2><Bar><Bar><Sec_B1><Bar>"])
def test_unfinished_sequence_is_reported(text):
    ids = VOCAB.parse(text)
    errors = GRAMMAR.validate(ids, "melody", PLAN)
    assert len(errors) == 1 and errors[0].index == len(ids) and "without <End>" in errors[0].reason


@pytest.mark.parametrize("stream,plan,text", [
    ("dynamics", PLAN_DYN, "<Sec_A1><Bar><Vel_50><Vel_58><Sec_B1><Bar><Vel_70><End>"),
    ("melody", PLAN, "<Sec_A2><Bar><Bar><Sec_B1><Bar><Pos_4><Rel_60><Dur_12><End>"),   # ends exactly at the end
    ("melody", PLAN, "<Sec_A2><Bar><Pos_0><Rel_60><Dur_1><Rel_64><Dur_1><Pos_2><Rel_60><Dur_1><Rel_62><Dur_1>"
                     "<Bar><Pos_0><Rel_60><Dur_1><Rel_64><Dur_1><Sec_B1><Bar><End>"),   # two pitches at each onset
    ("song", PLAN, "<Sec_A2><Bar><Tempo_90><Pos_15><Track_MELODY><Rel_60><Dur_33><Vel_50><Bar><TempoChange_-2>"
                   "<Sec_B1><Bar><Tempo_120><End>"),
])
def test_valid_handmade_sequence(stream, plan, text):
    assert GRAMMAR.validate(VOCAB.parse(text), stream, plan) == []


def test_every_pop909_encoding_validates(pop909_prepared):
    """Every task example of every kept POP909 song: prompt inputs and target have zero grammar errors."""
    from musicray.streams import Example

    _, tables = pop909_prepared
    examples = [Example(task, list(row.prompt), list(row.target), row.song_id)
                for task in TASKS for row in tables[task].itertuples()]
    assert len(examples) == len(TASKS) * tables["report"]["kept"]
    failures = [(ex.song_id, ex.task, errs) for ex, errs in zip(examples, validate_examples(GRAMMAR, examples))
                if any(errs.values())]
    assert not failures, failures[:3]


def bar_contents(seq: list[int]) -> dict[int, list[int]]:
    """Bar number (from 1) -> the tokens after its <Bar>, up to the next <Bar>, <Sec_..> or <End>."""
    bars, current = {}, None
    for token in seq:
        family = VOCAB.family[token]
        if family == "Bar":
            current = len(bars) + 1
            bars[current] = []
        elif family in ("Sec", "End"):
            current = None
        elif current is not None:
            bars[current].append(token)
    return bars


def test_forced_bars_are_reproduced_exactly_and_the_rest_stays_grammatical():
    """Random logits through the mask with half the bars given (taken from other masked samples): the given bars
    come out token for token, budgets still close the form, and every row is grammatical."""
    rng = random.Random(11)
    streams = [STREAM_NAMES[i % len(STREAM_NAMES)] for i in range(350)]
    plans = [random_plan(rng, s) for s in streams]
    with small_tensor_threads("cpu"):
        sources = sample_through_mask(streams, plans, seed=3)
        forced_plans = []
        for seq, plan in zip(sources, plans):
            given = {bar: tuple(tokens) for bar, tokens in bar_contents(seq).items() if rng.random() < 0.5}
            forced_plans.append(Plan(plan.sections, plan.metre, plan.quotas, tuple(sorted(given.items()))))
        minimum = GRAMMAR.tokens_to_finish(GRAMMAR.start(streams, forced_plans)).tolist()
        budgets = [m + rng.choice([0, 3, 30]) for m in minimum]
        sequences = sample_through_mask(streams, forced_plans, seed=4, budgets=budgets)
    assert sum(map(len, GRAMMAR.validate_batch(sequences, streams, plans))) == 0
    forced_bars = 0
    for seq, plan, budget in zip(sequences, forced_plans, budgets):
        bars = bar_contents(seq)
        for bar, tokens in plan.forced:
            assert bars[bar] == list(tokens)
            forced_bars += 1
        assert len(seq) <= budget
    assert forced_bars > 200


def test_a_forced_bar_refuses_other_tokens_and_more_content():
    forced = Plan(PLAN.sections, PLAN.metre, forced=((2, tuple(VOCAB.parse("<Pos_0><Rel_60><Dur_4>"))),))
    wrong = GRAMMAR.validate(VOCAB.parse("<Sec_A2><Bar><Bar><Pos_0><Rel_62><Dur_4><Sec_B1><Bar><End>"), "melody",
                             forced)
    assert wrong[0].index == 4 and "its next token is <Rel_60>" in wrong[0].reason
    more = GRAMMAR.validate(VOCAB.parse("<Sec_A2><Bar><Bar><Pos_0><Rel_60><Dur_4><Pos_4>"), "melody", forced)
    assert more[0].index == 6 and "given and complete" in more[0].reason
    right = "<Sec_A2><Bar><Pos_2><Rel_50><Dur_1><Bar><Pos_0><Rel_60><Dur_4><Sec_B1><Bar><End>"
    assert GRAMMAR.validate(VOCAB.parse(right), "melody", forced) == []


def random_copies(rng: random.Random, plan: Plan, share: float) -> tuple[tuple[int, int], ...]:
    """Some bars of the plan copying a random earlier bar; where the plan has quotas, one that owes the bar's quota
    (``Grammar.start`` refuses the others: such a bar could never close)."""
    copies = []
    for bar in range(2, plan.n_bars + 1):
        if rng.random() < share:
            if not plan.quotas:
                copies.append((bar, rng.randint(1, bar - 1)))
                continue
            sources = [source for source in range(1, bar) if plan.quotas[source - 1] == plan.quotas[bar - 1]]
            if sources:
                copies.append((bar, rng.choice(sources)))
    return tuple(copies)


COPYING_STREAMS = ("chord", "melody", "secondary", "notes", "tempo", "dynamics")


def test_copied_bars_repeat_their_source_and_budgets_still_close_the_form():
    """Random logits through the mask with bars copying earlier bars of the same row: each copied bar equals its
    source token for token (unless a copied note would pass the form's end), budgets count the copies, and every
    row validates against its plan."""
    rng = random.Random(21)
    streams = [COPYING_STREAMS[i % len(COPYING_STREAMS)] for i in range(400)]
    plans = []
    for stream in streams:
        plan = random_plan(rng, stream)
        copies = random_copies(rng, plan, 0.6)
        if stream == "dynamics":   # a bar copies the velocities of a bar with as many notes
            copies = tuple((bar, source) for bar, source in copies if plan.quotas[bar - 1] == plan.quotas[source - 1])
        plans.append(Plan(plan.sections, plan.metre, plan.quotas, copies=copies))
    minimum = GRAMMAR.tokens_to_finish(GRAMMAR.start(streams, plans)).tolist()
    budgets = [m + rng.choice([0, 2, 10, 60]) for m in minimum]
    with small_tensor_threads("cpu"):
        sequences = sample_through_mask(streams, plans, seed=7, budgets=budgets)
    assert sum(map(len, GRAMMAR.validate_batch(sequences, streams, plans))) == 0
    copied = equal = 0
    for seq, plan, budget in zip(sequences, plans, budgets):
        assert len(seq) <= budget
        bars = bar_contents(seq)
        first_of_chain = {}
        for bar, source in plan.copies:   # a copy of a copy copies the chain's first bar
            first_of_chain[bar] = first_of_chain.get(source, source)
        for bar, source in first_of_chain.items():
            copied += 1
            if bars[bar] == bars[source]:
                equal += 1
            else:   # a copy ends early only where the source's next token cannot come: a note past the form's end
                first = next(k for k, (a, b) in enumerate(zip(bars[bar] + [None], bars[source])) if a != b)
                assert VOCAB.family[bars[source][first]] == "Dur", (bars[bar], bars[source])
    # Random durations reach up to 4 bars, so copies in a form's last bars often stop early.
    assert copied > 250 and equal / copied > 0.8, (equal, copied)


def test_a_copied_bar_refuses_other_tokens():
    plan = Plan((Section("A", 2), Section("B", 1)), "4/4", copies=((3, 1),))
    source = "<Sec_A2><Bar><Pos_0><Rel_60><Dur_4><Pos_8><Rel_64><Dur_2><Bar><Pos_2><Rel_50><Dur_1><Sec_B1><Bar>"
    assert GRAMMAR.validate(VOCAB.parse(source + "<Pos_0><Rel_60><Dur_4><Pos_8><Rel_64><Dur_2><End>"), "melody",
                            plan) == []
    wrong = GRAMMAR.validate(VOCAB.parse(source + "<Pos_0><Rel_62>"), "melody", plan)
    assert wrong[0].index == 15 and "its next token is <Rel_60>" in wrong[0].reason
    short = GRAMMAR.validate(VOCAB.parse(source + "<Pos_0><Rel_60><Dur_4><End>"), "melody", plan)
    assert short and short[0].index == 17


def test_a_copied_note_that_would_pass_the_form_end_ends_the_copy():
    plan = Plan((Section("A", 2),), "4/4", copies=((2, 1),))
    # Bar 1 ends on a note of 32 steps (into bar 2); in the last bar it would pass the form's end.
    text = "<Sec_A2><Bar><Pos_0><Rel_60><Dur_32><Bar><Pos_0><Rel_60><Dur_16><End>"
    assert GRAMMAR.validate(VOCAB.parse(text), "melody", plan) == []


@pytest.mark.parametrize("stream,quotas,copies,message", [
    ("melody", (), ((1, 1),), "cannot copy"), ("melody", (), ((2, 3),), "cannot copy"),
    ("melody", (), ((4, 1),), "cannot copy"),
    ("dynamics", (2, 3, 2), ((2, 1),), "owes 3 quota tokens"),   # a bar of another note count never closes
])
def test_impossible_copies_are_refused(stream, quotas, copies, message):
    with pytest.raises(ValueError, match=message):
        GRAMMAR.start([stream], [Plan((Section("A", 3),), "4/4", quotas, copies=copies)])


def test_a_dynamics_bar_may_copy_one_with_its_note_count():
    GRAMMAR.start(["dynamics"], [Plan((Section("A", 3),), "4/4", (2, 3, 2), copies=((3, 1),))])


def test_rows_started_apart_keep_their_given_and_copied_bars_in_one_batch():
    """A serving engine starts each request's state alone and batches them (concat_states): a row with given bars
    and a row with copied bars, stepped together, each keep theirs (the copy is followed by five bars, so no copied
    note can pass the form's end)."""
    from musicray.grammar import concat_states

    given_bar = tuple(VOCAB.parse("<Pos_0><Rel_60><Dur_4><Pos_4><Rel_62><Dur_4>"))
    plans = [Plan((Section("A", 2), Section("B", 2)), "4/4", forced=((2, given_bar),)),
             Plan((Section("A", 2), Section("B", 2), Section("C", 4)), "4/4", copies=((3, 1),))]
    state = concat_states([GRAMMAR.start(["melody"], [plan]) for plan in plans])
    generator = torch.Generator().manual_seed(2)
    rows = [[], []]
    while not bool(state.done.all()):
        tokens = torch.rand(2, len(VOCAB), generator=generator).masked_fill(~GRAMMAR.mask(state), -1.0).argmax(-1)
        for i in (0, 1):
            if not bool(state.done[i]):
                rows[i].append(int(tokens[i]))
        assert bool(GRAMMAR.step(state, tokens).all())
    assert bar_contents(rows[0])[2] == list(given_bar)
    assert bar_contents(rows[1])[3] == bar_contents(rows[1])[1]
    assert GRAMMAR.validate_batch(rows, ["melody", "melody"], plans) == [[], []]


# -- the row engine (small batches on Python rows) against the tensor engine -----------------------------------------
ON_TENSORS = Grammar(VOCAB, row_batch=0)
ON_ROWS = Grammar(VOCAB, row_batch=1 << 30)


def replay_on_both_engines(streams, plans, budgets=None, bodies=None, seed=0):
    """Step both engines side by side, each step asserting the same mask and the same accepted rows. Rows follow
    ``bodies`` (real tokens, some of which a plan may refuse) or sample uniformly among the allowed tokens, with a
    random, often refused, token one step in ten. Returns the sequences the rows emitted."""
    generator = torch.Generator().manual_seed(seed)
    on_rows, on_tensors = ON_ROWS.start(streams, plans, budgets), ON_TENSORS.start(streams, plans, budgets)
    steps = max(map(len, bodies)) if bodies else 400   # (a random plan may leave a row no way to close)
    emitted = [[] for _ in streams]
    for t in range(steps):
        mask = ON_ROWS.mask(on_rows)
        assert torch.equal(mask, ON_TENSORS.mask(on_tensors)), f"step {t}: the engines' masks differ"
        if bodies:
            tokens = torch.tensor([body[t] if t < len(body) else 0 for body in bodies])
            active = torch.tensor([t < len(body) for body in bodies])
        elif bool(on_tensors.done.all()):
            break
        else:
            logits = torch.rand(len(streams), len(VOCAB), generator=generator)
            tokens = logits.masked_fill(~mask, -1.0).argmax(-1)
            if t % 10 == 5:
                tokens = torch.randint(len(VOCAB), (len(streams),), generator=generator)
            active = ~on_tensors.done
        ok = ON_ROWS.step(on_rows, tokens, active)
        assert torch.equal(ok, ON_TENSORS.step(on_tensors, tokens, active)), f"step {t}: accepted rows differ"
        for i in torch.nonzero(ok).flatten().tolist():
            emitted[i].append(int(tokens[i]))
    assert torch.equal(ON_ROWS.tokens_to_finish(on_rows), ON_TENSORS.tokens_to_finish(on_tensors))
    on_rows.sync()
    for name in ("node", "section", "bar", "budget", "low", "high", "forced_next", "forced_end", "written",
                 "bar_length", "forced_extra_after", "copies_of_open_bar", "quota_left", "at_position"):
        assert torch.equal(getattr(on_rows, name), getattr(on_tensors, name)), name
    return emitted


def random_guard(rng: random.Random, plan: Plan) -> Plan:
    """``plan`` with a random harmony guard: a third of the Chord tokens, and 1-3 Pitch sets changing at random
    bars and positions (the engines must agree on it, not make music)."""
    chords, pitches = VOCAB.ids_of["Chord"], len(VOCAB.ids_of["Pitch"])
    sets = tuple(tuple(sorted(rng.sample(range(pitches), rng.randint(0, 30)))) for _ in range(rng.randint(1, 3)))
    positions = metre(plan.metre).positions_per_bar
    changes = tuple(sorted({(rng.randint(1, plan.n_bars), rng.randrange(positions), rng.randrange(len(sets)))
                            for _ in range(rng.randint(1, 4))}))
    return dataclasses.replace(plan, guard_chords=tuple(rng.sample(chords, len(chords) // 3)),
                               guard_pitch_sets=sets, guard_pitch_changes=changes)


@pytest.mark.parametrize("features", [(), ("budget",), ("forced", "budget"), ("copies", "budget"), ("guard",),
                                      ("forced", "copies", "guard", "budget")])
def test_the_row_engine_masks_and_steps_as_the_tensor_engine(features):
    """Random plans of every stream with the plan features in ``features``: same masks, same accepted tokens."""
    rng = random.Random(len(features) * 7 + 1)
    streams = [STREAM_NAMES[i % len(STREAM_NAMES)] for i in range(42)]
    plans = [random_plan(rng, s) for s in streams]
    if "forced" in features or "copies" in features:
        sources = sample_through_mask(streams, plans, seed=3)
        edited = []
        for seq, plan in zip(sources, plans):
            bars = bar_contents(seq)
            forced = tuple(sorted((b, tuple(c)) for b, c in bars.items() if rng.random() < 0.3)) \
                if "forced" in features else ()
            # (a dynamics bar copies the velocities of a bar with as many notes)
            copies = tuple((b, s) for b, s in random_copies(rng, plan, 0.5) if b not in dict(forced)
                           and (not plan.quotas or plan.quotas[b - 1] == plan.quotas[s - 1])) \
                if "copies" in features else ()
            edited.append(Plan(plan.sections, plan.metre, plan.quotas, forced, copies))
        plans = edited
    if "guard" in features:
        plans = [random_guard(rng, p) if s in ("chord", "melody", "secondary", "song") else p
                 for s, p in zip(streams, plans)]
    budgets = None
    if "budget" in features:
        minimum = ON_TENSORS.tokens_to_finish(ON_TENSORS.start(streams, plans)).tolist()
        budgets = [m + rng.choice([0, 1, 3, 20]) for m in minimum]
    with small_tensor_threads("cpu"):
        replay_on_both_engines(streams, plans, budgets, seed=len(features))


def test_the_row_engine_agrees_on_real_pop909_streams(pop909_root):
    """Every body of every task of real POP909 songs (their first 600 tokens), as they are, with half their bars
    given, with bars copying earlier ones (some real tokens are then refused) and with the harmony guard: the two
    engines agree at every token."""
    from musicray.data.pop909 import load_song, song_ids
    from musicray.harmony_guard import guard_plan

    streams, plans, bodies, songs = [], [], [], 0
    rng = random.Random(9)
    for song_id in rng.sample(song_ids(pop909_root), 6):
        try:
            song, _ = load_song(pop909_root, song_id)
        except SongError:   # a skipped song (docs/quantization.md)
            continue
        songs += 1
        song = quantized(song, VOCAB)
        for task in TASKS:
            for _, body, stream, plan in example_bodies(encode(song, task, VOCAB), VOCAB):
                bars = bar_contents(body)
                variants = [plan, guard_plan(plan, stream, song, VOCAB),
                            dataclasses.replace(plan, forced=tuple((b, tuple(c)) for b, c in bars.items() if b % 2)),
                            dataclasses.replace(plan, copies=random_copies(rng, plan, 0.3))]
                for variant in variants:
                    streams.append(stream)
                    plans.append(variant)
                    bodies.append(body[:600])
        if songs == 2:
            break
    assert len(bodies) >= 2 * 4 * len(TASKS)
    with small_tensor_threads("cpu"):
        replay_on_both_engines(streams, plans, bodies=bodies)
