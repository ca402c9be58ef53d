"""Song <-> MIDI: exact round trips, the file as other software sees it, foreign files and bad input."""

import io
import itertools
import os
import random
from pathlib import Path

import mido
import miditoolkit
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from musicray.data.synth import synth_song
from musicray.harmony import parse_key
from musicray.instruments import DEFAULT_INSTRUMENTS, GM_PROGRAMS, instrument_programs, parse_instrument
from musicray.midi import (
    collapse_tempos, midi_instruments, midi_to_song, read_midi, set_instruments, song_to_midi, write_midi,
)
from musicray.song import TRACKS, Chord, Note, Section, Song, SongError, Tempo

ROOT = Path(__file__).resolve().parents[1]
POP909_DIR = Path(os.environ.get("POP909_DIR", ROOT.parent / "shared" / "datasets" / "pop909"))


def first_seed_with_metre(name: str) -> int:
    return next(seed for seed in range(1000) if synth_song(seed).metre == name)


SYNTH_SEEDS = sorted({0, 1, 2, first_seed_with_metre("4/4"), first_seed_with_metre("3/4"),
                      first_seed_with_metre("12/8")})


def hand_built_song() -> Song:
    """Corners the synthesizer does not reach: 6/8, a minor key without a key signature of its spelling, a slash
    chord and no-chord, repeated same-pitch notes, an empty track, repeated and unrounded tempi."""
    return Song(
        song_id="hand-built",
        key="Db:min",
        metre="6/8",
        sections=[Section("i", 1), Section("A", 2)],
        chords=[Chord(0, 0, "Db:min"), Chord(1, 0, "Gb:maj7/5"), Chord(1, 3, "N"), Chord(2, 0, "Ab:7")],
        tracks={
            "MELODY": [Note(1, 0, 61, 2, 100), Note(1, 2, 61, 1, 90), Note(1, 3, 64, 3, 127), Note(2, 0, 68, 6, 1)],
            "BRIDGE": [],
            "PIANO": [Note(0, 0, 37, 6, 60), Note(0, 0, 56, 6, 50), Note(0, 0, 61, 6, 50), Note(2, 5, 0, 1, 40),
                      Note(2, 5, 127, 1, 40)],
        },
        tempos=[Tempo(0, 0, 72.5), Tempo(0, 3, 72.5), Tempo(1, 0, 70.123456789), Tempo(2, 0, 80.0),
                Tempo(2, 3, 80.0)],
    )


def expected_after_midi(song: Song) -> Song:
    return song.replace(tempos=collapse_tempos(song.tempos))


ROUND_TRIP_SONGS = [pytest.param(lambda seed=seed: synth_song(seed), id=f"synth-{seed}") for seed in SYNTH_SEEDS]
ROUND_TRIP_SONGS.append(pytest.param(hand_built_song, id="hand-built"))


# -- round trips ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_song", ROUND_TRIP_SONGS)
def test_round_trip_through_a_file(make_song, tmp_path):
    song = make_song()
    path = write_midi(song, tmp_path / "out" / "song.mid")
    assert read_midi(path) == expected_after_midi(song)


@pytest.mark.parametrize("make_song", ROUND_TRIP_SONGS)
def test_round_trip_in_memory_and_through_bytes(make_song):
    song = make_song()
    midi = song_to_midi(song)
    assert midi_to_song(midi) == expected_after_midi(song)
    buffer = io.BytesIO()
    midi.dump(file=buffer)
    assert midi_to_song(buffer.getvalue()) == expected_after_midi(song)


def test_synth_seeds_cover_every_metre():
    assert {synth_song(seed).metre for seed in SYNTH_SEEDS} == {"4/4", "3/4", "12/8"}


@pytest.mark.parametrize("ticks_per_beat", [96, 120, 960])
def test_round_trip_at_other_resolutions(ticks_per_beat):
    for song in (synth_song(first_seed_with_metre("12/8")), hand_built_song()):
        assert midi_to_song(song_to_midi(song, ticks_per_beat)) == expected_after_midi(song)


def test_resolution_that_does_not_divide_the_grid_is_refused():
    with pytest.raises(SongError, match="ticks_per_beat 10"):
        song_to_midi(synth_song(first_seed_with_metre("4/4")), ticks_per_beat=10)


def test_a_song_without_tempo_comes_back_without_tempo():
    song = hand_built_song().replace(tempos=[])
    assert midi_to_song(song_to_midi(song)).tempos == []


def through_bytes(midi: miditoolkit.MidiFile) -> Song:
    buffer = io.BytesIO()
    midi.dump(file=buffer)
    return midi_to_song(buffer.getvalue())


@pytest.mark.parametrize("tempos", [
    [Tempo(1, 0, 70.0)],  # nothing at the start: miditoolkit's filler 120 qpm must not come back
    [Tempo(0, 0, 80.0), Tempo(1, 3, 81.0)],  # 80 bpm of dotted quarters is that same 120 qpm, and real
])
def test_tempo_at_and_after_the_start(tempos):
    song = hand_built_song().replace(tempos=tempos)
    assert through_bytes(song_to_midi(song)).tempos == tempos


def test_tempo_edited_in_a_sequencer_wins_over_its_marker():
    midi = song_to_midi(hand_built_song())
    midi.tempo_changes[0].tempo = 150.0  # quarter notes per minute; the 6/8 beat is a dotted quarter
    assert through_bytes(midi).tempos[0] == Tempo(0, 0, 100.0)


def test_song_id_comes_from_argument_then_marker():
    song = hand_built_song()
    assert midi_to_song(song_to_midi(song), song_id="other").song_id == "other"
    assert midi_to_song(song_to_midi(song)).song_id == "hand-built"


@pytest.mark.parametrize("song_id", ["chanson-é", "歌 01"])
def test_any_song_id_survives_a_file(song_id, tmp_path):
    song = hand_built_song().replace(song_id=song_id)
    assert read_midi(write_midi(song, tmp_path / "song.mid")).song_id == song_id


def test_collapse_tempos_keeps_change_points_only():
    tempos = [Tempo(0, 0, 90.0), Tempo(0, 4, 90.0), Tempo(0, 8, 91.5), Tempo(0, 12, 90.0), Tempo(1, 0, 90.0)]
    assert collapse_tempos(tempos) == [Tempo(0, 0, 90.0), Tempo(0, 8, 91.5), Tempo(0, 12, 90.0)]


# -- the file as an independent parser reads it --------------------------------------------------------------------
@pytest.mark.parametrize("make_song", ROUND_TRIP_SONGS)
def test_written_file_read_by_mido(make_song, tmp_path):
    song = make_song()
    parsed = mido.MidiFile(str(write_midi(song, tmp_path / "song.mid")))
    assert parsed.ticks_per_beat == 480
    named = {}
    for track in parsed.tracks:
        names = [msg.name for msg in track if msg.type == "track_name"]
        if names:
            named[names[0]] = track
    assert list(named) == list(TRACKS)
    for name, track in named.items():
        note_ons = [msg for msg in track if msg.type == "note_on" and msg.velocity > 0]
        assert len(note_ons) == len(song.tracks[name])
        changes = [msg for msg in track if msg.type == "program_change"]
        assert [(msg.program, msg.time) for msg in changes] == [(DEFAULT_INSTRUMENTS[name], 0)]
    channels = {name: {msg.channel for msg in track if not msg.is_meta} for name, track in named.items()}
    assert all(len(used) == 1 for used in channels.values()) and len(set.union(*channels.values())) == 3
    assert 9 not in set.union(*channels.values()), "channel 10 is General MIDI's drum kit"

    meta = [msg for track in parsed.tracks for msg in track if msg.is_meta]
    signatures = [msg for msg in meta if msg.type == "time_signature"]
    assert [(s.numerator, s.denominator) for s in signatures] == [(song.spec.numerator, song.spec.denominator)]
    tempos = [msg for msg in meta if msg.type == "set_tempo"]
    changes = collapse_tempos(song.tempos)
    assert len(tempos) == len(changes)
    qpm = mido.tempo2bpm(tempos[-1].tempo)
    assert qpm == pytest.approx(changes[-1].bpm * song.spec.beat_unit, rel=1e-5)
    assert len([msg for msg in meta if msg.type == "key_signature"]) == 1
    markers = [msg.text for msg in meta if msg.type == "marker"]
    assert f"metre:{song.metre}" in markers
    assert [m for m in markers if m.startswith("section:")] == [f"section:{s.label}{s.bars}" for s in song.sections]


@pytest.mark.parametrize("make_song", ROUND_TRIP_SONGS)
def test_written_file_as_a_daw_reads_it_with_pretty_midi(make_song, tmp_path):
    """Key and time signature, the tempo map in seconds and the section markers on the bars pretty_midi counts."""
    import pretty_midi

    song = make_song()
    path = write_midi(song, tmp_path / "song.mid")
    pm = pretty_midi.PrettyMIDI(str(path))
    assert [(s.numerator, s.denominator, s.time) for s in pm.time_signature_changes] == \
        [(song.spec.numerator, song.spec.denominator, 0.0)]
    tonic, mode = parse_key(song.key)
    assert [(k.key_number, k.time) for k in pm.key_signature_changes] == [(tonic + (12 if mode == "min" else 0), 0.0)]
    # The tempo map: each change at the time the tempos before it give, with its quarter notes per minute.
    changes = collapse_tempos(song.tempos)
    expected_times, seconds, previous = [], 0.0, None
    for change in changes:
        beats = (change.bar * song.spec.positions_per_bar + change.position) / song.spec.positions_per_beat
        if previous is not None:
            seconds += (beats - previous[0]) * 60 / previous[1]
        expected_times.append(seconds)
        previous = (beats, change.bpm)
    times, qpm = pm.get_tempo_changes()
    assert times.tolist() == pytest.approx(expected_times, abs=1e-3)
    assert qpm.tolist() == pytest.approx([c.bpm * song.spec.beat_unit for c in changes], rel=1e-5)
    # Each section marker on the downbeat of its section's first bar.
    markers = [(msg.text, tick) for track in mido.MidiFile(str(path)).tracks
               for tick, msg in zip(itertools.accumulate(m.time for m in track), track) if msg.type == "marker"]
    section_times = [pm.tick_to_time(tick) for text, tick in markers if text.startswith("section:")]
    downbeats = pm.get_downbeats()
    assert section_times == pytest.approx([downbeats[start] for start in song.section_starts()], abs=1e-6)
    sounding = [name for name in TRACKS if song.tracks[name]]  # pretty_midi leaves out a track without notes
    assert [(i.name, len(i.notes)) for i in pm.instruments] == [(name, len(song.tracks[name])) for name in sounding]


# -- instruments ---------------------------------------------------------------------------------------------------
def test_each_track_has_its_own_instrument_by_default():
    assert set(DEFAULT_INSTRUMENTS) == set(TRACKS)
    assert len(set(DEFAULT_INSTRUMENTS.values())) == len(TRACKS)
    assert GM_PROGRAMS[DEFAULT_INSTRUMENTS["MELODY"]].startswith("Lead")
    assert "Piano" in GM_PROGRAMS[DEFAULT_INSTRUMENTS["PIANO"]]
    assert len(GM_PROGRAMS) == 128 and GM_PROGRAMS[73] == "Flute"


@pytest.mark.parametrize("make_song", ROUND_TRIP_SONGS)
def test_chosen_instruments_are_written_and_the_song_reads_back_the_same(make_song, tmp_path):
    song = make_song()
    path = write_midi(song, tmp_path / "song.mid", instruments={"melody": "Flute", "BRIDGE": 24})
    assert midi_instruments(path) == {"MELODY": 73, "BRIDGE": 24, "PIANO": DEFAULT_INSTRUMENTS["PIANO"]}
    assert read_midi(path) == expected_after_midi(song)
    assert midi_to_song(song_to_midi(song, instruments={"PIANO": "electric piano 1"})) == expected_after_midi(song)


def test_instruments_by_number_or_name_and_clear_errors():
    assert instrument_programs({"PIANO": "ACOUSTIC-grand piano", "MELODY": "lead 1 (square)", "BRIDGE": "48"}) == \
        {"MELODY": 80, "BRIDGE": 48, "PIANO": 0}
    assert parse_instrument("bridge=Violin") == ("BRIDGE", 40)
    with pytest.raises(SongError, match="'DRUMS'.*MELODY, BRIDGE, PIANO"):
        instrument_programs({"DRUMS": 0})
    with pytest.raises(SongError, match="program 128 is outside 0..127"):
        instrument_programs({"MELODY": 128})
    with pytest.raises(SongError, match="'flut' is not a General MIDI instrument.*did you mean: Flute"):
        parse_instrument("MELODY=flut")
    with pytest.raises(SongError, match="not TRACK=INSTRUMENT"):
        parse_instrument("flute")


def test_set_instruments_changes_only_the_named_tracks(tmp_path):
    midi = song_to_midi(hand_built_song())
    set_instruments(midi, {"bridge": "Oboe"})
    buffer = io.BytesIO()
    midi.dump(file=buffer)
    assert midi_instruments(buffer.getvalue()) == {**DEFAULT_INSTRUMENTS, "BRIDGE": 68}


def test_key_signatures_use_names_a_signature_has():
    for key, signature in [("C:maj", "C"), ("Gb:maj", "Gb"), ("Eb:min", "Ebm"), ("Db:min", "C#m"), ("A:min", "Am")]:
        midi = song_to_midi(hand_built_song().replace(key=key))
        assert [ks.key_name for ks in midi.key_signature_changes] == [signature]


# -- files musicray did not write -------------------------------------------------------------------------------------
def foreign_midi(numerator=3, denominator=4, key="Ebm", names=("Lead Synth", "Drums")) -> miditoolkit.MidiFile:
    midi = miditoolkit.MidiFile(ticks_per_beat=480)
    midi.time_signature_changes = [miditoolkit.TimeSignature(numerator, denominator, 0)]
    if key:
        midi.key_signature_changes = [miditoolkit.KeySignature(key, 0)]
    midi.tempo_changes = [miditoolkit.TempoChange(100.0, 0)]
    lead = miditoolkit.Instrument(program=80, is_drum=False, name=names[0])
    lead.notes = [
        miditoolkit.Note(velocity=90, pitch=72, start=5, end=470),  # a little late and short: rounds onto the grid
        miditoolkit.Note(velocity=0, pitch=74, start=480, end=960),  # silent: dropped
        miditoolkit.Note(velocity=80, pitch=76, start=960, end=1000),  # shorter than a step: one step
    ]
    drums = miditoolkit.Instrument(program=0, is_drum=True, name=names[1])
    drums.notes = [miditoolkit.Note(velocity=100, pitch=36, start=0, end=60)]
    midi.instruments = [drums, lead]
    return midi


def test_foreign_file_takes_first_melodic_instrument_as_melody(tmp_path):
    path = tmp_path / "user tune.mid"
    foreign_midi().dump(str(path))
    song = midi_to_song(path)
    assert (song.song_id, song.metre, song.key, song.form, song.chords) == ("user tune", "3/4", "Eb:min", "A1", [])
    assert song.tracks == {"MELODY": [Note(0, 0, 72, 4, 90), Note(0, 8, 76, 1, 80)], "BRIDGE": [], "PIANO": []}
    assert song.tempos == [Tempo(0, 0, 100.0)]


def test_foreign_file_without_signatures_falls_back_to_4_4_and_c_major():
    midi = foreign_midi(numerator=7, denominator=8, key=None)
    song = midi_to_song(midi)
    assert (song.metre, song.key) == ("4/4", "C:maj")
    assert midi_to_song(miditoolkit.MidiFile()).form == "A1"


def test_foreign_compound_metre_tempo_is_per_dotted_quarter():
    song = midi_to_song(foreign_midi(numerator=12, denominator=8))
    assert song.metre == "12/8" and song.tempos == [Tempo(0, 0, pytest.approx(100.0 / 1.5))]


def test_foreign_tracks_match_names_case_insensitively_and_long_songs_split():
    midi = foreign_midi(numerator=4, denominator=4, names=(" melody ", "Piano"))
    midi.instruments[0].is_drum = False
    midi.instruments[0].notes.append(miditoolkit.Note(velocity=50, pitch=40, start=70 * 1920 - 480, end=70 * 1920))
    song = midi_to_song(midi)
    assert [len(song.tracks[name]) for name in TRACKS] == [2, 0, 2]
    assert song.form == "A32A32A6"


def test_reads_a_pop909_song():
    path = POP909_DIR / "POP909" / "001" / "001.mid"
    if not path.exists():
        pytest.skip(f"POP909 not found at {path} (set POP909_DIR)")
    song = read_midi(path)
    song.check()
    assert song.song_id == "001"
    assert all(len(song.tracks[name]) > 100 for name in TRACKS)
    assert song.tempos and 60 < song.tempos[0].bpm < 200
    last_end = max(n.bar * song.spec.positions_per_bar + n.position + n.duration for _, n in song.notes())
    assert song.n_bars == -(-last_end // song.spec.positions_per_bar)


# -- bad input ------------------------------------------------------------------------------------------------------
def valid_bytes() -> bytes:
    buffer = io.BytesIO()
    song_to_midi(hand_built_song()).dump(file=buffer)
    return buffer.getvalue()


BAD_INPUTS = [
    ("empty", lambda: b"", "empty file"),
    ("header only", lambda: valid_bytes()[:14], "truncated"),
    ("truncated", lambda: valid_bytes()[: len(valid_bytes()) // 2], "truncated"),
    ("random bytes", lambda: random.Random(0).randbytes(400), "not a Standard MIDI File"),
    ("text", lambda: b"title: my song\nnotes: C D E\n" * 5, "not a Standard MIDI File"),
    ("garbage after header", lambda: b"MThd" + random.Random(1).randbytes(200), "corrupt"),
]


@pytest.mark.parametrize("make_bytes,problem", [pytest.param(f, p, id=i) for i, f, p in BAD_INPUTS])
def test_bad_file_raises_song_error_naming_file_and_problem(make_bytes, problem, tmp_path):
    path = tmp_path / "bad.mid"
    path.write_bytes(make_bytes())
    with pytest.raises(SongError, match=problem) as caught:
        read_midi(path)
    assert str(path) in str(caught.value)
    # No chained traceback from inside mido: the message is the whole story.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


@pytest.mark.parametrize("make_bytes,problem", [pytest.param(f, p, id=i) for i, f, p in BAD_INPUTS])
def test_bad_upload_raises_song_error(make_bytes, problem):
    with pytest.raises(SongError, match=problem):
        midi_to_song(make_bytes())


def test_missing_file_raises_song_error(tmp_path):
    with pytest.raises(SongError, match="nope.mid: cannot read"):
        read_midi(tmp_path / "nope.mid")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_files_give_a_song_or_a_song_error(data):
    raw = bytearray(valid_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(raw)))
    try:
        midi_to_song(bytes(raw[:cut])).check()
    except SongError:
        pass
