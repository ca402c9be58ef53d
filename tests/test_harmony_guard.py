"""The harmony guard: its tables (measured on POP909, read per key and chord), masked generation that obeys them,
and real data that the grammar still accepts with a guarded plan (the guard masks generation, never validation)."""

import json
import random

import pytest
import torch

from musicray.data.guard_tables import build_tables
from musicray.encoding import decode_body, encode
from musicray.grammar import Grammar, Plan, small_tensor_threads
from musicray.harmony import DEGREE_NAMES, PITCH_CLASS_NAMES, parse_chord, parse_key, reference_pitch_class
from musicray.harmony_guard import (GUARD_TABLES_PATH, GUARDED_TRACKS, check_tables, chord_ids, guard_plan,
                                    load_tables, outside_guard, pitch_values)
from musicray.song import TRACKS, Chord, Section, Song, Tempo
from musicray.tokens import LEGACY_LANGUAGE, VocabConfig, Vocabulary

TABLES = load_tables()
RELATIVE, ABSOLUTE = Vocabulary(), Vocabulary(VocabConfig(**LEGACY_LANGUAGE))
TONIC_DEGREE = Vocabulary(VocabConfig(chords="degree"))
STAGE_TRACK = {"melody": "MELODY", "secondary": "BRIDGE"}

# (key, chord, allowed in that key): the common chords of each mode and the other mode's colour chords POP909 uses,
# against chords it (almost) never does.
CHORD_CASES = [
    ("C:maj", "G:maj", True),     # V
    ("C:maj", "A:min7", True),    # vi7
    ("C:maj", "F:min", True),     # iv borrowed from the minor: 1 % of major-key chord time is enough
    ("C:maj", "Ab:maj", True),    # bVI, borrowed
    ("C:maj", "Eb:min", False),   # bIII minor
    ("C:maj", "Db:min", False),   # bII minor
    ("A:min", "G:maj", True),     # bVII
    ("A:min", "E:maj", True),     # the harmonic minor's V
    ("A:min", "C#:maj", False),   # III major
    ("A:min", "Bb:min", False),   # bII minor
    ("Gb:maj", "Db:7", True),     # V7 in a flat key: degrees count from the tonic
    ("Gb:maj", "C:min", False),   # #IV minor
]

# (key, chord sounding, track, MIDI pitch, allowed): scale or chord tone, and the track's register.
LOW, HIGH = TABLES.registers["MELODY"]
BRIDGE_LOW, BRIDGE_HIGH = TABLES.registers["BRIDGE"]
PITCH_CASES = [
    ("C:maj", "G:7", "MELODY", 65, True),        # F: in the scale and the chord's seventh
    ("C:maj", "G:7", "MELODY", 66, False),       # F#: in neither
    ("C:maj", "D:7", "MELODY", 66, True),        # F#: the secondary dominant's third
    ("A:min", "E:maj", "MELODY", 68, True),      # G#: the dominant's third, outside A natural minor
    ("A:min", "N", "MELODY", 68, False),         # no chord sounds: the scale alone
    ("A:min", "N", "MELODY", 69, True),
    ("C:maj", "C:maj", "MELODY", LOW - 12, False),   # below the register, though a chord tone
    ("C:maj", "C:maj", "MELODY", HIGH + 12 - (HIGH + 12) % 12, False),   # a C above it
    ("Eb:maj", "Ab:maj", "BRIDGE", BRIDGE_LOW + (3 - BRIDGE_LOW) % 12, True),   # the lowest Eb of the register
    ("Eb:maj", "Ab:maj", "BRIDGE", BRIDGE_LOW + (3 - BRIDGE_LOW) % 12 - 12, False),
    ("Eb:maj", "Bb:7", "BRIDGE", 100, False),
]


def chord_token(key: str, label: str, vocab: Vocabulary) -> str:
    """The token of ``label`` in ``key``, spelt out here (tests/test_encoding.py pins the chord languages' tokens)."""
    tonic, mode = parse_key(key)
    root, quality, _ = parse_chord(label)
    origin = (tonic + 3) % 12 if vocab.config.chords == "relative_major" and mode == "min" else tonic
    name = PITCH_CLASS_NAMES[root] if vocab.config.chords == "absolute" else DEGREE_NAMES[(root - origin) % 12]
    return f"<Chord_{name}:{quality}>"


@pytest.mark.parametrize("vocab", [RELATIVE, TONIC_DEGREE, ABSOLUTE], ids=["relative_major", "degree", "absolute"])
@pytest.mark.parametrize("key,label,allowed", CHORD_CASES)
def test_the_chord_table_allows_the_modes_chords(vocab, key, label, allowed):
    assert (vocab.id(chord_token(key, label, vocab)) in chord_ids(key, vocab, TABLES)) == allowed


@pytest.mark.parametrize("vocab", [RELATIVE, ABSOLUTE], ids=["relative", "absolute"])
@pytest.mark.parametrize("key,chord,track,pitch,allowed", PITCH_CASES)
def test_the_pitch_table_keeps_scale_or_chord_tones_in_register(vocab, key, chord, track, pitch, allowed):
    written = pitch - reference_pitch_class(chord, key) if vocab.config.pitch == "chord" else pitch
    assert (written in pitch_values(key, chord, TABLES.registers[track], vocab)) == allowed


def test_the_stored_tables_are_what_pop909_measures(pop909_root):
    """The package's JSON is the script's output on POP909's training split, and it keeps its promise: 99 % of the
    chord time per mode, 99 % of each track's notes in register."""
    stored = json.loads(GUARD_TABLES_PATH.read_text())
    check_tables(TABLES)
    measured = build_tables(pop909_root, stored["chord_share"], stored["register_share"])
    assert measured["chords"] == stored["chords"] and measured["registers"] == stored["registers"]
    for mode, cover in measured["measured"]["chords"].items():
        assert cover["share_covered"] >= 0.99 and cover["chords_kept"] < cover["chords_used"] / 2, mode
    for track in GUARDED_TRACKS:
        notes = measured["measured"]["notes"][track]
        assert notes["in_register"] >= 0.99 and notes["kept_by_guard"] >= 0.98, (track, notes)


def sample_through_mask(grammar, streams, plans, seed, tokens_per_bar=None):
    """Random logits through the mask until every row ends (within the form's minimum and ``tokens_per_bar`` more
    per bar, when given); every step leaves each row some token."""
    generator = torch.Generator().manual_seed(seed)
    budgets = None
    if tokens_per_bar is not None:
        minimum = grammar.tokens_to_finish(grammar.start(streams, plans)).tolist()
        budgets = [m + tokens_per_bar * plan.n_bars for m, plan in zip(minimum, plans)]
    state = grammar.start(streams, plans, budgets)
    steps, end = [], grammar.vocab.token("End")
    with small_tensor_threads("cpu"):
        while not bool(state.done.all()):
            mask = grammar.mask(state)
            assert bool((mask.any(1) | state.done).all()), "a guard left a row without any token"
            tokens = torch.rand(len(streams), len(grammar.vocab), generator=generator).masked_fill(~mask, -1).argmax(-1)
            assert bool(grammar.step(state, tokens).all())
            steps.append(tokens)
    return [row[:row.index(end)] for row in torch.stack(steps, 1).tolist()]


def composed(songs, vocab, guard: bool, seed: int = 0):
    """Each song's chord, melody and secondary streams drawn from random logits (melodic ones over the song's own
    chords), decoded into copies of the songs; and the streams, plans and bodies."""
    grammar = Grammar(vocab)
    rows = [(song, stream) for song in songs for stream in ("chord", "melody", "secondary")]
    plans = []
    for song, stream in rows:
        plan = Plan(tuple(song.sections), song.metre)
        plans.append(guard_plan(plan, stream, song, vocab) if guard else plan)
    bodies = sample_through_mask(grammar, [s for _, s in rows], plans, seed, tokens_per_bar=24)
    out = []
    for (song, stream), body in zip(rows, bodies):
        assert grammar.validate(body + [vocab.token("End")], stream, Plan(tuple(song.sections), song.metre)) == []
        written = Song(song.song_id, song.key, song.metre, list(song.sections),
                       chords=[] if stream == "chord" else list(song.chords), tracks={name: [] for name in TRACKS},
                       tempos=[Tempo(0, 0, 100.0)])
        decode_body(body, stream, written, vocab)
        out.append(written)
    return out


@pytest.mark.parametrize("vocab", [RELATIVE, ABSOLUTE], ids=["relative", "absolute"])
def test_guarded_generation_keeps_chords_pitches_and_registers(synthetic_songs, vocab):
    """The worst model (uniform logits) under the guard writes only the mode's chords, and melodies in the key's
    scale or the sounding chord, each in its register; unguarded, the same model leaves them everywhere."""
    from musicray.eval.generation import first_bars

    songs = [first_bars(song, 8) for song in synthetic_songs[:6]]
    guarded = composed(songs, vocab, guard=True)
    assert [found for song in guarded for found in outside_guard(song)] == []
    assert sum(len(song.chords) for song in guarded) > 20
    assert sum(len(song.tracks[t]) for song in guarded for t in GUARDED_TRACKS) > 150
    free = composed(songs, vocab, guard=False)
    assert len([found for song in free for found in outside_guard(song)]) > 100


def test_a_guard_that_allows_nothing_falls_back_to_the_grammar():
    """An empty pitch set (or one under a rising second pitch) never leaves a step without a token: the step is
    unguarded; and a forced bar comes out as given even where the guard would refuse its tokens."""
    vocab, grammar = RELATIVE, Grammar(RELATIVE)
    sections = (Section("A", 2),)
    empty = Plan(sections, "4/4", guard_pitch_sets=((),), guard_pitch_changes=((1, 0, 0),))
    single = Plan(sections, "4/4", guard_pitch_sets=((60,),), guard_pitch_changes=((1, 0, 0),))
    forced_bar = tuple(vocab.parse("<Pos_0><Chord_bII:min>"))
    forced = Plan(sections, "4/4", forced=((2, forced_bar),), guard_chords=(vocab.id("<Chord_I:maj>"),))
    bodies = sample_through_mask(grammar, ["melody", "melody", "chord"], [empty, single, forced], seed=1)
    pitches = [vocab.value[t] for t in bodies[1] if vocab.family[t] == "Pitch"]
    assert pitches and set(pitches) == {60}
    chords = [vocab.tokens[t] for t in bodies[2] if vocab.family[t] == "Chord"]
    assert chords[-1] == "<Chord_bII:min>" and set(chords[:-1]) <= {"<Chord_I:maj>"}
    assert any(vocab.family[t] == "Pitch" for t in bodies[0])


def test_guarded_plans_of_real_songs_still_validate_and_the_mask_keeps_most_real_notes(pop909_root):
    """On real POP909 songs: the grammar accepts every chord, melody and secondary body under its guarded plan
    (validation is unguarded), and the guard's mask would have allowed most of the real tokens (the rest are the
    1-2 % of real notes outside scale, chord or register, and chords outside the 99 %)."""
    from musicray.data.pop909 import load_song, song_ids
    from musicray.song import SongError

    vocab, grammar = RELATIVE, Grammar(RELATIVE)
    bodies, streams, plans = [], [], []
    for song_id in random.Random(0).sample(song_ids(pop909_root), 6):
        try:
            song, _ = load_song(pop909_root, song_id)
        except SongError:   # a skipped song (docs/quantization.md): not what this test is about
            continue
        for task in ("chord", "melody", "secondary"):
            example = encode(song, task, vocab)
            bodies.append(example.target)
            streams.append(task)
            plans.append(guard_plan(Plan.from_prompt(example.prompt, vocab), task, song, vocab))
    assert len(bodies) >= 12
    assert grammar.validate_batch(bodies, streams, plans) == [[] for _ in bodies]
    lengths = torch.tensor([len(body) for body in bodies])
    padded = torch.zeros((len(bodies), int(lengths.max())), dtype=torch.long)
    for i, body in enumerate(bodies):
        padded[i, :len(body)] = torch.tensor(body)
    family = torch.tensor([{"Chord": 1, "Pitch": 2}.get(f, 0) for f in vocab.family])
    kept, seen = torch.zeros(3), torch.zeros(3)
    state = grammar.start(streams, plans)
    with small_tensor_threads("cpu"):
        for t in range(padded.shape[1]):
            tokens, active = padded[:, t], t < lengths
            allowed = grammar.mask(state).gather(1, tokens[:, None])[:, 0]
            seen.index_add_(0, family[tokens], active.float())
            kept.index_add_(0, family[tokens], (active & allowed).float())
            grammar.step(state, tokens, active)
    assert seen[2] > 2000 and kept[2] / seen[2] > 0.96, (kept, seen)
    assert kept[1] / seen[1] > 0.95, (kept, seen)


def test_chord_changes_hold_until_the_next():
    song = Song("s", "C:maj", "4/4", [Section("A", 2)], chords=[Chord(0, 8, "G:maj"), Chord(1, 4, "F:maj")],
                tracks={name: [] for name in TRACKS}, tempos=[Tempo(0, 0, 100.0)])
    plan = guard_plan(Plan((Section("A", 2),), "4/4"), "melody", song, RELATIVE)
    # no chord before (0, 8): the tonic's scale; then G, then F
    assert [(bar, position) for bar, position, _ in plan.guard_pitch_changes] == [(1, 0), (1, 8), (2, 4)]
    assert len(set(k for *_, k in plan.guard_pitch_changes)) == 3
