"""decode(encode(song)) == quantized(song) for every task and every language (relative, absolute, track velocity,
tonic-degree chords): synthetic, hypothesis-generated and real songs."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from song_strategies import songs

from musicray.encoding import SongTokens, decode, encode, encode_quantized, project, round_trip_song
from musicray.quantize import base_tempo, quantized, representable_pitch
from musicray.song import Chord, Note, Section, Song, SongError, Tempo, song_from_dict
from musicray.streams import OPTIONAL_INPUTS, TASK_INPUTS, Example
from musicray.tokens import LEGACY_LANGUAGE, TASKS, VocabConfig, Vocabulary

VOCAB = Vocabulary()
ABSOLUTE = Vocabulary(VocabConfig(**LEGACY_LANGUAGE))
TRACK_VELOCITY = Vocabulary(VocabConfig(velocity="track"))
TONIC_DEGREE = Vocabulary(VocabConfig(chords="degree"))
LANGUAGES = {"relative": VOCAB, "absolute": ABSOLUTE, "track velocity": TRACK_VELOCITY,
             "tonic-degree chords": TONIC_DEGREE}


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("task", TASKS)
def test_round_trip_synthetic(task, language, synthetic_songs):
    vocab = LANGUAGES[language]
    for song in synthetic_songs:
        expected, decoded = round_trip_song(song, task, vocab)
        assert decoded == expected, (song.song_id, task)
        for optional in OPTIONAL_INPUTS.get(task, ()):
            expected, decoded = round_trip_song(song, task, vocab, (optional,))
            assert decoded == expected, (song.song_id, task, optional)


@settings(max_examples=150, deadline=None)
@given(song=songs(), task=st.sampled_from(TASKS), language=st.sampled_from(sorted(LANGUAGES)))
def test_round_trip_hypothesis(song, task, language):
    song.check()
    for optional in [(), *((name,) for name in OPTIONAL_INPUTS.get(task, ()))]:
        expected, decoded = round_trip_song(song, task, LANGUAGES[language], optional)
        assert decoded == expected


def test_relative_language_writes_degrees_chord_intervals_and_tempo_changes():
    song = Song("rel", "G:maj", "4/4", [Section("A", 3)],
                chords=[Chord(0, 0, "G:maj"), Chord(1, 0, "D:7/3"), Chord(2, 0, "N")],
                tracks={"MELODY": [Note(0, 0, 71, 4, 90), Note(1, 0, 66, 4, 90), Note(2, 0, 67, 4, 90)],
                        "BRIDGE": [], "PIANO": []},
                tempos=[Tempo(0, 0, 90.0), Tempo(1, 0, 90.0), Tempo(2, 0, 150.0)])
    melody = VOCAB.describe(encode(song, "melody", VOCAB).target)
    # B over G is 4 semitones above the root (+ octaves); F# over D 4; G with no chord counts from the tonic G.
    assert melody == ("<Sec_A3><Bar><Pos_0><Rel_64><Dur_4><Bar><Pos_0><Rel_64><Dur_4><Bar><Pos_0><Rel_60><Dur_4>"
                      "<End>")
    chords = VOCAB.describe(encode(song, "chord", VOCAB).target)
    assert chords == "<Sec_A3><Bar><Pos_0><Chord_I:maj><Bar><Pos_0><Chord_V:7><Bass_3><Bar><Pos_0><Chord_N><End>"
    tempo = VOCAB.describe(encode(song, "tempo", VOCAB).target)
    assert tempo == "<Sec_A3><Bar><Tempo_90><Bar><TempoChange_0><Bar><Tempo_150><End>"  # +60 is past the change range
    # the tempo task's melody input has no chords to count from: it counts from the key's tonic (G = 7)
    prompt = VOCAB.describe(encode(song, "tempo", VOCAB).prompt)
    assert "<Pos_0><Rel_64><Dur_4><Bar><Pos_0><Rel_59><Dur_4>" in prompt
    assert ABSOLUTE.describe(encode(song, "melody", ABSOLUTE).target).startswith("<Sec_A3><Bar><Pos_0><Pitch_71>")


# (chord language, key, chord, its token): relative_major (the default) counts a minor key's chords from its relative
# major, so a diatonic chord is one token in both modes (A minor's i is C major's vi); major keys write as in 'degree'.
CHORD_LANGUAGE_CASES = [
    ("degree", "A:min", "A:min", "<Chord_I:min>"),
    ("relative_major", "A:min", "A:min", "<Chord_VI:min>"),
    ("relative_major", "C:maj", "A:min", "<Chord_VI:min>"),
    ("relative_major", "A:min", "G:maj", "<Chord_V:maj>"),
    ("relative_major", "A:min", "E:7", "<Chord_III:7>"),      # the harmonic minor's V7 is III7 of C
    ("relative_major", "F#:min", "C#:maj", "<Chord_III:maj>"),   # F# minor counts from A
    ("relative_major", "Eb:maj", "Bb:maj", "<Chord_V:maj>"),
    ("absolute", "A:min", "A:min", "<Chord_A:min>"),
]


@pytest.mark.parametrize("chords,key,label,token", CHORD_LANGUAGE_CASES)
def test_chord_languages_write_each_chord_from_their_origin(chords, key, label, token):
    vocab = Vocabulary(VocabConfig(**{**({} if chords != "absolute" else LEGACY_LANGUAGE), "chords": chords}))
    song = Song("key", key, "4/4", [Section("A", 1)], chords=[Chord(0, 0, label)],
                tracks={name: [] for name in ("MELODY", "BRIDGE", "PIANO")}, tempos=[Tempo(0, 0, 90.0)])
    assert vocab.describe(encode(song, "chord", vocab).target) == f"<Sec_A1><Bar><Pos_0>{token}<End>"
    expected, decoded = round_trip_song(song, "chord", vocab)
    assert decoded == expected


def test_saved_vocabularies_without_language_fields_load_as_absolute(tmp_path):
    data = ABSOLUTE.to_json()
    data["config"] = {k: v for k, v in data["config"].items() if k not in LEGACY_LANGUAGE}
    (tmp_path / "vocabulary.json").write_text(json.dumps(data))
    assert Vocabulary.load(tmp_path).tokens == ABSOLUTE.tokens


@pytest.mark.parametrize("field,value", [("chords", "roman"), ("pitch", "interval"), ("tempo", "delta"),
                                         ("max_tempo_change", -1)])
def test_bad_language_settings_name_the_field(field, value):
    with pytest.raises(SongError, match=f"vocab.{field}"):
        VocabConfig(**{field: value})


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


def test_every_pop909_song_round_trips_with_tonic_degree_chords(pop909_prepared):
    """The tonic-degree chord language (the default before issue 17) changes the chord tokens alone: every kept
    POP909 song's chords, and the melody written over them, decode to the quantized song."""
    _, tables = pop909_prepared
    for row in tables["songs"].itertuples():
        song = song_from_dict(json.loads(row.song_json))
        for task in ("chord", "melody"):
            expected, decoded = round_trip_song(song, task, TONIC_DEGREE)
            assert decoded == expected, (row.song_id, task)


# -- SongTokens: the six examples of a song from one shared encoding ---------------------------------------------
@pytest.mark.parametrize("language", LANGUAGES)
def test_song_tokens_examples_are_each_tasks_example_and_share_bodies(language, synthetic_songs):
    vocab = LANGUAGES[language]
    song = quantized(synthetic_songs[5], vocab)
    tokens = SongTokens(song, vocab)
    for task in TASKS:
        for optional in [()] + [(name,) for name in OPTIONAL_INPUTS.get(task, ())]:
            shared, alone = tokens.example(task, optional), encode_quantized(song, task, vocab, optional)
            assert (shared.prompt, shared.target) == (alone.prompt, alone.target)
    # chord x3, melody and secondary with the chords given, notes, dynamics, tempo, melody before the chords
    assert len(tokens._bodies) == 8
    assert tokens.body("melody") is tokens.body("melody", chords_known=True)


def test_song_tokens_body_orders_a_position_as_the_grammar_reads_it():
    """A bar's section, <Bar> and tempo; at a position <Pos>, chord and bass, then each track's marker and notes
    (in the track's order); the downbeat's chord restated in the next bar."""
    loud, soft = (ABSOLUTE.quantize_velocity(v) for v in (90, 60))
    song = Song("order", "C:maj", "4/4", [Section("A", 2)], chords=[Chord(0, 0, "G:maj/3")],
                tracks={"MELODY": [Note(0, 4, 72, 2, loud)], "BRIDGE": [],
                        "PIANO": [Note(0, 4, 48, 4, soft), Note(0, 4, 55, 4, loud), Note(1, 8, 50, 1, soft)]},
                tempos=[Tempo(0, 0, 100.0), Tempo(1, 0, 101.0)])
    tokens = SongTokens(song, ABSOLUTE)
    assert ABSOLUTE.describe(tokens.body("song")) == (
        f"<Sec_A2><Bar><Tempo_100><Pos_0><Chord_G:maj><Bass_3>"
        f"<Pos_4><Track_MELODY><Pitch_72><Dur_2><Vel_{loud}><Track_PIANO><Pitch_48><Dur_4><Vel_{soft}>"
        f"<Pitch_55><Dur_4><Vel_{loud}>"
        f"<Bar><Tempo_101><Pos_0><Chord_G:maj><Bass_3><Pos_8><Track_PIANO><Pitch_50><Dur_1><Vel_{soft}>")
    assert ABSOLUTE.describe(tokens.body("dynamics")) == (
        f"<Sec_A2><Bar><Vel_{loud}><Vel_{soft}><Vel_{loud}><Bar><Vel_{soft}>")


def test_song_tokens_reject_what_the_vocabulary_cannot_write():
    song = Song("long", "C:maj", "4/4", [Section("A", 1)], tracks={"MELODY": [Note(0, 0, 60, 99, 80)]},
                tempos=[Tempo(0, 0, 120.0)])
    with pytest.raises(SongError, match="Dur_99"):
        SongTokens(song, VOCAB)
    outside = song.replace(tracks={"MELODY": [Note(3, 0, 60, 4, 82)]})
    with pytest.raises(SongError, match="outside the form"):
        SongTokens(outside, VOCAB)


def test_array_quantizers_match_the_scalar_rules():
    old_representable = [p + 12 * max(0, -(-(11 - p) // 12)) - 12 * max(0, -(-(p - 116) // 12)) for p in range(-40, 200)]
    assert [representable_pitch(p) for p in range(-40, 200)] == old_representable
    assert representable_pitch(np.arange(-40, 200)).tolist() == old_representable
    velocities = np.arange(0, 128)
    n = VOCAB.config.velocity_bins
    assert VOCAB.quantize_velocities(velocities).tolist() == [
        VOCAB.velocity_values[min(n - 1, max(0, int((v - 1) * n / 127)))] for v in range(0, 128)]
    assert VOCAB.quantize_durations(np.array([-3, 0, 1, 64, 65])).tolist() == [1, 1, 1, 64, 64]


@pytest.mark.parametrize("track", [0, 1, 2])
def test_track_velocities_are_bins_of_the_track_level_that_sound_inside_midi(track):
    """'track' velocities: each quantized velocity is a bin centre plus its track's offset, inside 1..127, the
    nearest such value to the velocity (the top and bottom bins a track cannot sound at are left out)."""
    offset = TRACK_VELOCITY.config.track_velocity_offsets[track]
    sounding = sorted(c + offset for c in TRACK_VELOCITY.velocity_values if 1 <= c + offset <= 127)
    quantized_velocities = TRACK_VELOCITY.quantize_velocities(np.arange(1, 128), track)
    assert set(quantized_velocities.tolist()) <= set(sounding)
    assert np.all(np.diff(quantized_velocities) >= 0)
    velocities = np.arange(1, 128)
    inside = (velocities >= sounding[0]) & (velocities <= sounding[-1])
    assert np.all(np.abs(quantized_velocities - velocities)[inside] <= 127 / TRACK_VELOCITY.config.velocity_bins)
    # a velocity beyond what the track's bins sound at takes the nearest end (e.g. a melody note at 5 plays at 12)
    assert set(quantized_velocities[~inside].tolist()) <= {sounding[0], sounding[-1]}
    for value in TRACK_VELOCITY.velocity_values:
        assert 1 <= TRACK_VELOCITY.sounding_velocity(value, track) <= 127


def test_track_velocities_write_one_token_for_each_track_level():
    """A melody note at its track's level and a piano note at its track's own level are the same token: the
    token says how loud the note is for its track (the model need not tell the tracks apart to get levels)."""
    melody_level, piano_level = (85 + TRACK_VELOCITY.config.track_velocity_offsets[t] for t in (0, 2))
    song = quantized(Song("levels", "C:maj", "4/4", [Section("A", 1)],
                          tracks={"MELODY": [Note(0, 0, 72, 4, melody_level)], "BRIDGE": [],
                                  "PIANO": [Note(0, 0, 48, 4, piano_level)]}, tempos=[Tempo(0, 0, 100.0)]),
                     TRACK_VELOCITY)
    dynamics = [t for t in SongTokens(song, TRACK_VELOCITY).body("dynamics") if TRACK_VELOCITY.family[t] == "Vel"]
    assert len(dynamics) == 2 and dynamics[0] == dynamics[1]
    melody, piano = song.tracks["MELODY"][0].velocity, song.tracks["PIANO"][0].velocity
    assert melody - piano == (TRACK_VELOCITY.config.track_velocity_offsets[0]
                              - TRACK_VELOCITY.config.track_velocity_offsets[2])


@pytest.mark.parametrize("field, value", [("velocity", "loud"), ("track_velocity_offsets", (1, 2)),
                                          ("track_velocity_offsets", (1, 2, 99)), ("track_velocity_offsets", "abc")])
def test_bad_velocity_language_names_the_field(field, value):
    with pytest.raises(SongError, match=f"vocab.{field}"):
        VocabConfig(**{field: value})


def test_track_velocity_offsets_from_json_lists_equal_the_default_tuple(tmp_path):
    path = TRACK_VELOCITY.save(tmp_path)
    loaded = Vocabulary.load(path)
    assert loaded.config == TRACK_VELOCITY.config and loaded.config.velocity == "track"


@pytest.mark.parametrize("family", ["Pos", "Dur", "Vel", "Tempo"])
def test_ids_by_value_is_token_of_each_value(family):
    table = VOCAB.ids_by_value(family)
    for value, token in enumerate(table.tolist()):
        if token >= 0:
            assert token == VOCAB.token(family, value)
        else:
            with pytest.raises(SongError):
                VOCAB.token(family, value)
