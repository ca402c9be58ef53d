"""The synthetic songs: deterministic, valid, varied, and shaped like music."""

import statistics
from collections import Counter

import pytest

from musicray.data.synth import synth_song, synth_songs
from musicray.harmony import chord_pitch_classes
from musicray.song import TRACKS, Song

N_SEEDS = 200


@pytest.fixture(scope="module")
def songs() -> list[Song]:
    return [synth_song(seed) for seed in range(N_SEEDS)]


def chord_at(song: Song, bar: int, position: int) -> str:
    sounding = [c.label for c in song.chords if (c.bar, c.position) <= (bar, position)]
    return sounding[-1]


def test_same_seed_same_song_other_seed_other_song():
    assert synth_song(11) == synth_song(11)
    assert synth_song(11) != synth_song(12)
    assert synth_song(11, song_id="x").song_id == "x"


def test_synth_songs_name_their_seeds():
    batch = synth_songs(3, seed=10)
    assert [s.song_id for s in batch] == ["synth-0010", "synth-0011", "synth-0012"]
    assert batch == [synth_song(10), synth_song(11), synth_song(12)]


def test_every_song_is_valid(songs):
    for song in songs:
        song.check()
        spec = song.spec
        song_end = song.n_bars * spec.positions_per_bar
        assert list(song.tracks) == list(TRACKS)
        assert (song.chords[0].bar, song.chords[0].position) == (0, 0)
        assert song.chords == sorted(song.chords) and song.tempos == sorted(song.tempos)
        for name in TRACKS:
            notes = song.tracks[name]
            assert notes == sorted(notes)
            for note in notes:
                assert 1 <= note.duration <= 64 and note.position < spec.positions_per_bar
                assert note.bar * spec.positions_per_bar + note.position + note.duration <= song_end
                assert 1 <= note.velocity <= 127


def test_registers(songs):
    for song in songs:
        assert all(60 <= n.pitch <= 84 for n in song.tracks["MELODY"])
        assert all(52 <= n.pitch <= 72 for n in song.tracks["BRIDGE"])
        assert song.tracks["PIANO"]


def test_forms_metres_and_keys_vary(songs):
    metres = Counter(song.metre for song in songs)
    assert set(metres) == {"4/4", "3/4", "12/8"}
    assert metres["4/4"] > N_SEEDS / 2
    assert len({song.form for song in songs}) >= 8
    assert len({song.key for song in songs}) >= 20


def test_repeated_sections_repeat_their_music(songs):
    checked = 0
    for song in songs:
        starts = song.section_starts()
        occurrences = [(s, start) for s, start in zip(song.sections[:-1], starts)]  # the last one cadences
        by_label = {}
        for section, start in occurrences:
            by_label.setdefault((section.label, section.bars), []).append(start)
        for (label, bars), section_starts in by_label.items():
            if len(section_starts) < 2:
                continue

            def music(start):
                notes = [(n.bar - start, n.position, n.pitch, n.duration) for n in song.tracks["MELODY"]
                         if start <= n.bar < start + bars]
                return notes

            assert music(section_starts[0]) == music(section_starts[1])
            checked += 1
    assert checked > 50


def test_strong_beat_melody_notes_are_chord_tones(songs):
    for song in songs:
        strong = [n for n in song.tracks["MELODY"] if n.position % song.spec.positions_per_beat == 0]
        if not strong:
            continue
        tones = sum(n.pitch % 12 in chord_pitch_classes(chord_at(song, n.bar, n.position)) for n in strong)
        assert tones / len(strong) > 0.7, song.song_id


def test_velocities_are_phrased(songs):
    louder_melody = 0
    for song in songs:
        velocities = [n.velocity for _, n in song.notes()]
        assert statistics.pstdev(velocities) > 3
        melody = statistics.mean(n.velocity for n in song.tracks["MELODY"])
        piano = statistics.mean(n.velocity for n in song.tracks["PIANO"])
        louder_melody += melody > piano
    assert louder_melody == N_SEEDS
    # Choruses (B) are louder than intros (i) across the corpus.
    by_label = {"i": [], "B": []}
    for song in songs:
        for section, start in zip(song.sections, song.section_starts()):
            if section.label in by_label:
                by_label[section.label] += [n.velocity for n in song.tracks["PIANO"]
                                            if start <= n.bar < start + section.bars]
    assert statistics.mean(by_label["B"]) > statistics.mean(by_label["i"]) + 10


def test_tempo_has_one_value_per_beat_with_rubato_and_a_final_ritardando(songs):
    for song in songs:
        spec = song.spec
        assert len(song.tempos) == song.n_bars * spec.beats_per_bar
        assert all(t.position % spec.positions_per_beat == 0 for t in song.tempos)
        bpms = [t.bpm for t in song.tempos]
        median = statistics.median(bpms)
        assert 55 <= median <= 165
        assert len(set(bpms)) > len(bpms) / 2  # rubato: not a flat line
        last_bar = [t.bpm for t in song.tempos if t.bar == song.n_bars - 1]
        assert statistics.mean(last_bar) < median
        assert min(last_bar) < 0.92 * median
