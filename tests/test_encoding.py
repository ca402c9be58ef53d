"""decode(encode(song)) == quantized(song) for every task: synthetic, hypothesis-generated and real songs."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from musicray.encoding import OPTIONAL_INPUTS, TASK_INPUTS, Example, base_tempo, decode, encode, project, quantized, \
    round_trip_song
from musicray.harmony import CHORD_QUALITIES, CANONICAL_BASS_DEGREES, PITCH_CLASS_NAMES, chord_label
from musicray.song import METRES, SECTION_LABELS, TRACKS, Chord, Note, Section, Song, SongError, Tempo, song_from_dict
from musicray.tokens import TASKS, Vocabulary

VOCAB = Vocabulary()


@pytest.mark.parametrize("task", TASKS)
def test_round_trip_synthetic(task, synthetic_songs):
    for song in synthetic_songs:
        expected, decoded = round_trip_song(song, task, VOCAB)
        assert decoded == expected, (song.song_id, task)


@st.composite
def songs(draw):
    metre = METRES[draw(st.sampled_from(sorted(METRES)))]
    sections = draw(st.lists(st.builds(Section, st.sampled_from(SECTION_LABELS), st.integers(1, 4)),
                             min_size=1, max_size=3))
    n_bars = sum(s.bars for s in sections)
    time = st.tuples(st.integers(0, n_bars - 1), st.integers(0, metre.positions_per_bar - 1))
    label = st.one_of(st.just("N"), st.builds(
        lambda root, quality, bass: chord_label(root, quality, bass),
        st.integers(0, 11), st.sampled_from(list(CHORD_QUALITIES)), st.sampled_from(("",) + CANONICAL_BASS_DEGREES)))
    chords = draw(st.lists(st.builds(lambda t, lab: Chord(t[0], t[1], lab), time, label), max_size=8))
    note = st.builds(lambda t, p, d, v: Note(t[0], t[1], p, d, v), time, st.integers(0, 127), st.integers(1, 100),
                     st.integers(1, 127))
    tracks = {name: draw(st.lists(note, max_size=12)) for name in TRACKS}
    tempos = draw(st.lists(st.builds(lambda t, bpm: Tempo(t[0], t[1], bpm), time, st.floats(20, 300)), max_size=6))
    key = f"{draw(st.sampled_from(PITCH_CLASS_NAMES))}:{draw(st.sampled_from(['maj', 'min']))}"
    return Song("hyp", key, metre.name, sections, chords, tracks, tempos)


@settings(max_examples=150, deadline=None)
@given(song=songs(), task=st.sampled_from(TASKS))
def test_round_trip_hypothesis(song, task):
    song.check()
    for optional in [(), *((name,) for name in OPTIONAL_INPUTS.get(task, ()))]:
        expected, decoded = round_trip_song(song, task, VOCAB, optional)
        assert decoded == expected


@settings(max_examples=60, deadline=None)
@given(song=songs())
def test_quantized_is_a_fixed_point(song):
    once = quantized(song, VOCAB)
    assert quantized(once, VOCAB) == once


def test_prompts_carry_the_inputs_of_each_task(synthetic_songs):
    song = synthetic_songs[0]
    for task in TASKS:
        example = encode(song, task, VOCAB)
        inputs = [VOCAB.tokens[t][7:-1] for t in example.prompt if VOCAB.family[t] == "Input"]
        assert inputs == list(TASK_INPUTS[task])
        assert VOCAB.tokens[example.target[-1]] == "<End>"


def test_chords_for_a_given_melody_carry_it_in_the_prompt(synthetic_songs):
    song = synthetic_songs[2]
    plain, for_melody = encode(song, "chord", VOCAB), encode(song, "chord", VOCAB, ("melody",))
    assert [VOCAB.tokens[t] for t in for_melody.prompt if VOCAB.family[t] == "Input"] == ["<Input_melody>"]
    assert for_melody.target == plain.target
    assert for_melody.prompt[:len(plain.prompt)] == plain.prompt
    expected, decoded = round_trip_song(song, "chord", VOCAB, ("melody",))
    assert decoded == expected and decoded.tracks["MELODY"] and not decoded.tracks["BRIDGE"]
    with pytest.raises(SongError, match="takes no \\['chord'\\] input"):
        encode(song, "melody", VOCAB, ("chord",))


def test_dynamics_gives_one_velocity_per_note(synthetic_songs):
    song = quantized(synthetic_songs[1], VOCAB)
    example = encode(song, "dynamics", VOCAB)
    velocities = [t for t in example.target if VOCAB.family[t] == "Vel"]
    assert len(velocities) == sum(len(n) for n in song.tracks.values())


def test_vocabulary_json_round_trip(tmp_path):
    path = VOCAB.save(tmp_path)
    assert Vocabulary.load(path).tokens == VOCAB.tokens


def test_every_pop909_song_round_trips(pop909_prepared):
    """Each kept POP909 song's stored examples decode to its stored quantized song."""
    data_dir, tables = pop909_prepared
    songs = {row.song_id: song_from_dict(json.loads(row.song_json)) for row in tables["songs"].itertuples()}
    for task in TASKS:
        for row in tables[task].itertuples():
            song = songs[row.song_id]
            example = Example(task, list(row.prompt), list(row.target), row.song_id)
            assert decode(example, VOCAB) == project(song, task, base_tempo(song, VOCAB)), (row.song_id, task)
